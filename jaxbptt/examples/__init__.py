"""Runnable examples: `python -m jaxbptt.examples.char_lm`."""
