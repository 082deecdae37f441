"""msnet's version (the ground floor: imports nothing). pyproject.toml reads it from here."""

__version__ = "0.1.0"
