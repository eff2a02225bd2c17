"""ukmp: structured pruning and recovery of vision-language models."""

__version__ = "0.1.0"
