"""ganpipe: a distributed training pipeline for image GANs."""

__version__ = "0.1.0"
