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
CUSTOM_SIZES = [(500, 16, 64, 128), (1000, 16, 64, 256), (100, 32, 64, 128), (60, 32, 16, 32)]
COMBINATOR_SIZES = [(500, 16, 64, 256), (100, 32, 64, 128)]  # also core sizes: compare with the bare cells

PEER_SIZES = [(1000, 16, 64, 256), (1000, 1, 32, 64)]  # in the peers section, which also runs both methods
CORE = Section(
    "core", [(cell, *size) for cell in ("elman", "lstm", "gru") for size in CORE_SIZES if size not in PEER_SIZES]
    + [(f"{kind}-{cell}", *size) for kind in ("masked", "stacked2") for cell in ("elman", "lstm", "gru")
       for size in COMBINATOR_SIZES],
    ("jax.grad", "jaxbptt"), "jax.grad",
    "exact BPTT: jaxbptt against jax.grad through lax.scan of the same step and loss",
)
USER = Section(
    "user steps", [("hypergrad", 100, 32, 8, 16), ("hypergrad", 1000, 32, 8, 16), ("leaky", 2000, 4, 8, 32),
                   ("leaky", 20000, 4, 8, 32), ("lngru", 100, 32, 16, 64)] + [("custom", *size) for size in CUSTOM_SIZES],
    ("jax.grad", "jax.checkpoint", "jaxbptt"), "jax.grad",
    "steps written by hand, the default call (engine='auto'): a hypergradient step (one SGD step of an MLP with "
    "an inner jax.grad, B=32, D=8, H=16), a leaky integrator, a layer-normed GRU, the two-layer tanh step; "
    "beside jax.grad through lax.scan and lax.scan over jax.checkpoint(step)",
)
PEER_METHODS = ("jax.grad", "jaxbptt", "jax.checkpoint", "flax", "equinox", "torch")
PEERS = Section(
    "peers", [(cell, *size) for cell in ("elman", "lstm", "gru") for size in PEER_SIZES]
    + [("lstm", 25, 128, 1024, 1024)],
    PEER_METHODS, "jax.grad",
    "every method on the same model, loss and data: research default (1000,16,64,256), small-batch "
    "latency (1000,1,32,64) and DeepBench's training LSTM (25,128,1024,1024)",
)
OPTIONS = Section(
    "options", [(cell, 1000, 16, 64, 256) for cell in ("elman", "lstm", "gru")],
    ("jaxbptt", "k=10", "(5,10)", "(10,40)", "clip+diag"), "jaxbptt",
    "gradient options: cost relative to exact jaxbptt BPTT",
)
MEMORY = Section(
    "memory", [("elman", T, 16, 32, 256) for T in (4096, 16384)],
    ("jax.grad", "remat=sqrt"), "jax.grad",
    "long sequences: remat='sqrt' keeps sqrt(T) carries and recomputes",
)
PRECISION = Section(
    "precision", [(cell, 200, 16, 64, 128) for cell in ("elman", "lstm", "gru")],
    ("jax.grad bf16", "jaxbptt bf16"), "jax.grad bf16",
    "mixed precision: bfloat16 params and inputs, float32 carry; grad err is against float64",
)
POLICIES = Section(
    "policies", [("elman", T, 8, 32, 128) for T in (1000, 4096, 16384, 100_000)],
    ("jax.grad", "jaxbptt", "remat=64", "remat=sqrt", "binomial(16)"), "jax.grad",
    "every memory policy from 10^3 to 10^5 steps (Binomial(16): at most 16 carries kept)",
)
REVERSIBLE = Section(
    "reversible", [(cell, T, 8, 32, 128) for cell in ("revgru", "revlstm") for T in (1000, 4096, 16384)],
    ("jaxbptt", "invert", "remat=sqrt", "binomial(16)", "jax.grad"), "jaxbptt",
    "reversible cells (max_forget_bits=3, buffer sized for T): remat=Invert() rebuilds every carry with the "
    "step's inverse; ratios to storing every step (remat=None)",
)
QUICK = Section(
    "quick", [(cell, 100, 8, 16, 32) for cell in ("elman", "lstm", "gru", "custom", "leaky", "hypergrad")],
    ("jax.grad", "jaxbptt", "jax.checkpoint", "flax", "equinox", "torch", "k=10", "remat=sqrt"), "jax.grad",
    "smoke run: every method on small problems",
)
GRID = Section(
    "grid", [(cell, T, B, 16, H) for cell in ("elman", "lstm", "gru") for T in (25, 50, 100) for B in (8, 64)
             for H in (32, 128)] + [(cell, 60, 32, 16, 32) for cell in ("elman", "lstm", "gru")],
    ("jax.grad", "jaxbptt"), "jax.grad",
    "training shapes: T in {25, 50, 100}, B in {8, 64}, H in {32, 128}, D=16; and the sweep size (60, 32, 16, 32)",
)
GPU_UNROLLS = ("jaxbptt", "jaxbptt u=2", "jaxbptt u=4", "jaxbptt u=8")
GPU = Section(
    "gpu", [("lstm", 25, 128, 1024, 1024), ("gru", 25, 128, 1024, 1024), ("lstm", 1000, 1, 32, 64),
            ("lstm", 1000, 16, 64, 256), ("gru", 1000, 16, 64, 256), ("elman", 1000, 16, 64, 256),
            ("lstm", 200, 256, 512, 512)],
    ("jax.grad", *GPU_UNROLLS, "torch", "flax"), "jax.grad",
    "one GPU: DeepBench training LSTM / GRU, per-step latency at batch 1, research default, a large batch; "
    "jaxbptt at unroll 1, 2, 4, 8",
)

# online gradients (benchmarks/_online_methods.py, its own table): RTRL's memory grows as H^3 and its time as H^4 per step; SnAp-1's memory as H^2
ONLINE_METHOD_CONFIGS = [("elman", 100, 4, 8, H) for H in (8, 16, 32)] + [("gru", 100, 4, 8, 16)]
ONLINE_METHOD_TINY = [("elman", 10, 2, 4, 4)]

SUITES = {"default": [CORE, USER, PEERS, OPTIONS, PRECISION, GRID], "user": [USER], "grid": [GRID], "quick": [QUICK], "memory": [MEMORY, POLICIES, REVERSIBLE], "gpu": [GPU],
          # no sections, their own tables: _online_methods.py, _parallel_time.py, _sharded_sweep.py
          "online": [], "parallel": [], "sharded-sweep": []}

# Measurements that are not (configuration x method) tables, run after a suite's sections when the
# suite is run unfiltered (see `benchmarks.__main__.EXTRAS`).
SUITE_EXTRAS = {"default": ("online", "sweep"), "memory": ("online",), "online": ("online", "online_methods"),
                "parallel": ("parallel",), "sharded-sweep": ("sharded_sweep",)}

# `--smoke`: every configuration of a section at this (T, B, D, H), so each cell and method of every
# section runs through the same code path in seconds; it checks that the main job works, and
# measures nothing worth reading.
SMOKE_SIZE = (6, 2, 3, 4)


def smoke_configs(configs: list) -> list:
    """One tiny configuration per cell, in the section's order."""
    return list(dict.fromkeys((config[0], *SMOKE_SIZE) for config in configs))
