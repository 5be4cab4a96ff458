"""ARFlow: autoregressive flow with hybrid linear attention (arXiv 2501.16085)."""

__version__ = "0.1.0"
