"""Built-in stages, one module per concept. The engine reads only `base.Stage`."""
