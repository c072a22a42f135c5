"""Low-rank self-play fine-tuning (SPIN, T-SPIN) of small language models."""

__version__ = "0.1.0"
