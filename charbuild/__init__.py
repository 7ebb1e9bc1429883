"""charbuild: a declarative, cached build tool for character training of language models."""

__version__ = "0.1.0"
