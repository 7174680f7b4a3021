"""Learning layer: torch models, baselines, sequence datasets, trainer and ranking metrics (pure)."""
