"""Benchmark suites: named sections, each a list of configurations (cell, T, B, D, H), the methods
run on every one of them, and the method the section's ratios divide by."""

from typing import NamedTuple


class Section(NamedTuple):
    name: str
    configs: list
    methods: tuple
    baseline: str
    note: str


CORE_SIZES = [(1000, 16, 64, 256), (1000, 1, 32, 64), (200, 64, 128, 512), (100, 32, 64, 128),
              (500, 16, 64, 256), (200, 32, 128, 256)]
CUSTOM_SIZES = [(500, 16, 64, 128), (1000, 16, 64, 256), (100, 32, 64, 128)]

CORE = Section(
    "core", [(cell, *size) for cell in ("elman", "lstm", "gru") for size in CORE_SIZES]
    + [("custom", *size) for size in CUSTOM_SIZES],
    ("jax.grad", "jaxbptt"), "jax.grad",
    "exact BPTT: jaxbptt against jax.grad through lax.scan of the same step and loss",
)
OPTIONS = Section(
    "options", [(cell, 1000, 16, 64, 256) for cell in ("elman", "lstm", "gru")] + [("lstm", 500, 32, 64, 128)],
    ("jaxbptt", "k=10", "(5,10)", "(10,40)", "clip+diag"), "jaxbptt",
    "gradient options: cost relative to exact jaxbptt BPTT",
)
MEMORY = Section(
    "memory", [("elman", T, 16, 32, 256) for T in (4096, 16384)],
    ("jax.grad", "jaxbptt", "remat=sqrt"), "jax.grad",
    "long sequences: remat='sqrt' keeps sqrt(T) carries and recomputes",
)
PRECISION = Section(
    "precision", [(cell, 200, 16, 64, 128) for cell in ("elman", "lstm", "gru", "custom")],
    ("jax.grad bf16", "jaxbptt bf16"), "jax.grad bf16",
    "mixed precision: bfloat16 params and inputs, float32 carry; grad err is against float64",
)
POLICIES = Section(
    "policies", [("elman", T, 8, 32, 128) for T in (1000, 4096, 16384, 100_000)],
    ("jax.grad", "jaxbptt", "remat=64", "remat=sqrt", "binomial(16)"), "jax.grad",
    "every memory policy from 10^3 to 10^5 steps (Binomial(16): at most 16 carries kept)",
)
QUICK = Section(
    "quick", [(cell, 200, 16, 32, 64) for cell in ("elman", "lstm", "gru", "custom")],
    ("jax.grad", "jaxbptt", "k=10", "remat=sqrt"), "jax.grad", "smoke run",
)

SUITES = {"default": [CORE, OPTIONS, MEMORY, PRECISION], "quick": [QUICK], "memory": [POLICIES]}
