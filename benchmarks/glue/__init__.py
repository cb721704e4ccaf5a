"""GLUE study scripts: one per experiment of docs/results.md (see benchmarks/glue/common.py)."""
