"""Figure scripts: they read run directories (metrics.json, .hydra/config.yaml, saved arrays) only."""
