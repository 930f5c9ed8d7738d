"""powerd: a GPU power controller for LLM inference nodes."""

__version__ = "0.1.0"
