"""The reverse-scan engine: kernels, the step split, the reverse scan and memory policies."""
