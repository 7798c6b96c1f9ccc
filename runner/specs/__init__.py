"""Agent specs: the models, loading YAML with positions, and validation."""
