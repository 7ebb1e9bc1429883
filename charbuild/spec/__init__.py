"""The spec: what a user declares in YAML (model.py), how it is loaded with file:line
errors, `extends:` and `--set` (loader.py), and its list-valued defaults (defaults.py)."""
