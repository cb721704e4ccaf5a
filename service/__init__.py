"""Multi-task model server for supermask-fine-tuned BERT."""

__version__ = "0.1.0"
