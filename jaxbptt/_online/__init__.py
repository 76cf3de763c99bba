"""Gradients computed forward in time, and online training."""
