"""Small training utilities: LR schedule, RNG state, preemption signals, metrics, synthetic data."""
