"""jaxbptt benchmarks: `python -m benchmarks` (see README)."""
