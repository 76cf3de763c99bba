"""Parallel in time, and across devices."""
