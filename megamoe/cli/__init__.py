"""Command lines over the library, installed as `megamoe-*` commands (see pyproject.toml)."""
