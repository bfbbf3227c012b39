"""The xkt Flower app bundle: shims only (see pyproject.toml)."""
