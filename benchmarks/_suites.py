"""Benchmark suites: lists of (cell, T, B, D, H)."""

CORE_SIZES = [(1000, 16, 64, 256), (1000, 1, 32, 64), (200, 64, 128, 512), (100, 32, 64, 128),
              (500, 16, 64, 256), (200, 32, 128, 256)]
CUSTOM_SIZES = [(500, 16, 64, 128), (1000, 16, 64, 256), (100, 32, 64, 128)]

SUITES = {
    "default": [(cell, *size) for cell in ("elman", "lstm", "gru") for size in CORE_SIZES]
    + [("custom", *size) for size in CUSTOM_SIZES],
    "quick": [(cell, 200, 16, 32, 64) for cell in ("elman", "lstm", "gru", "custom")],
}
