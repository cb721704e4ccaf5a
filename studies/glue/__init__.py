"""GLUE study scripts: one per experiment of docs/results.md (see studies/glue/common.py)."""
