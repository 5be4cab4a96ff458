"""Flow matching: the training objective (transport) and the autoregressive samplers."""
