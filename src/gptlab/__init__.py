"""gptlab: a reproducible lab for training GPT language models from scratch."""

__version__ = "0.1.0"
