"""Runnable examples: each module is one demo, run from the repository root with `python -m examples.NAME`."""
