"""Multi-task model server for supermask-fine-tuned BERT."""

from importlib.metadata import version

__version__ = version("supermask-server")  # one source of truth: pyproject.toml
