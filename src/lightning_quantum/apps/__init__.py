"""Applications: the only modules that import hydra and fastapi."""
