"""Cells and step combinators."""
