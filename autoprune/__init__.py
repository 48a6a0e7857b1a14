"""autoprune: search per-layer pruning policies for PyTorch models under a resource budget."""

__version__ = "0.1.0"
