"""xkt shared code: models, artifacts, data contract, the built-in benchmark."""
