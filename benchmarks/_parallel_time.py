"""`--suite parallel`: parallel-in-time forms against the sequential loop, side by side in one run.

Three tables, every time the median of interleaved calls of jit-compiled functions (float32 data):
1. `jaxbptt.linear_scan` (forward, and forward + backward; `method="auto"`, sequential on a CPU)
   against `lax.scan` of the same recurrence, `jax.grad` through it, the sequential engine
   (`jaxbptt.value_and_grad` of the one-step recurrence, gradients with respect to `h0`, `a`, `b`),
   and `linear_scan(method="associative")` and `method="chunked"` forward + backward;
2. LRU and minGRU training steps (per-step MSE loss): `cell.parallel` under `jax.grad`, the
   sequential engine `jaxbptt.value_and_grad(cell.step)`, and `jax.grad` through `lax.scan`;
3. DEER and quasi-DEER on Elman and GRU cells (batch mapped with `jax.vmap`): Newton iterations
   and forward time against `lax.scan`, and forward + backward against `jax.grad` through it.
"""

from __future__ import annotations

import statistics

import jax
import jax.numpy as jnp
from jax import lax

import jaxbptt as jb

from ._harness import _time, device_name

FULL = {"scan": [(T, 8, 256) for T in (1000, 10_000, 30_000)],  # 10^5: 16 GB resident, too much for a shared machine
        "cells": [(cell, T, 8, 64, 256) for cell in ("lru", "mingru") for T in (1000, 10_000)],
        "deer": [(cell, T, 8, 2, 16) for cell in ("elman", "gru") for T in (1000, 10_000)]}
SMOKE = {"scan": [(64, 2, 8)], "cells": [("lru", 64, 2, 3, 8), ("mingru", 64, 2, 3, 8)],
         "deer": [("elman", 16, 2, 2, 4)]}  # DEER's code is the same for every step


def _interleaved(fns: dict, args, budget_s: float, max_repeats: int = 15) -> dict:
    """Median ms of each jit-compiled function, its calls interleaved (after one warm-up call each)."""
    compiled = {name: jax.jit(fn).lower(*args).compile() for name, fn in fns.items()}
    calls = {name: (lambda c=c: jax.block_until_ready(c(*args))) for name, c in compiled.items()}
    first = sum(_time(call) for call in calls.values())
    repeats = int(min(max_repeats, max(3, budget_s / max(first, 1e-9))))
    times = {name: [] for name in calls}
    names = list(calls)
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            times[name].append(_time(calls[name]))
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def _recurrence(T, B, H):
    k = jax.random.split(jax.random.key(0), 3)
    a = jax.random.uniform(k[0], (T, B, H), jnp.float32, 0.9, 1.0)
    return a, jax.random.normal(k[1], (T, B, H)), jax.random.normal(k[2], (B, H))


def _sequential_scan(a, b, h0):
    return lax.scan(lambda h, ab: (ab[0] * h + ab[1],) * 2, h0, (a, b))[1]


def _grad_of(scan):
    return jax.value_and_grad(lambda a, b, h0: jnp.sum(jnp.square(scan(a, b, h0))), argnums=(0, 1, 2))


def _engine(a, b, h0):
    """`jaxbptt.value_and_grad` of the one-step recurrence, the same loss and gradients."""
    step = lambda _, h, ab: (ab[0] * h + ab[1],) * 2
    grad = jb.value_and_grad(step, lambda h, _: jnp.sum(jnp.square(h)), argnums=(1, 2))
    (loss, _), (dh0, (da, db)) = grad(None, h0, (a, b), jnp.zeros(b.shape[:1], b.dtype))
    return loss, (da, db, dh0)


def linear_scan_rows(sizes, budget_s):
    rows = []
    associative = lambda a, b, h0: jb.linear_scan(a, b, h0, method="associative")
    chunked = lambda a, b, h0: jb.linear_scan(a, b, h0, method="chunked")
    for T, B, H in sizes:
        fns = {"lax.scan fwd": _sequential_scan, "linear_scan fwd": jb.linear_scan,
               "jax.grad(lax.scan)": _grad_of(_sequential_scan), "jaxbptt engine": _engine,
               "linear_scan fwd+bwd": _grad_of(jb.linear_scan), "associative fwd+bwd": _grad_of(associative),
               "chunked fwd+bwd": _grad_of(chunked)}
        ms = _interleaved(fns, _recurrence(T, B, H), budget_s)
        rows.append(dict(T=T, B=B, H=H, ms=ms, fwd_speedup=ms["lax.scan fwd"] / ms["linear_scan fwd"],
                         grad_speedup=ms["jax.grad(lax.scan)"] / ms["linear_scan fwd+bwd"]))
    return rows


def _mse(y, t):
    return jnp.mean((y - t) ** 2)


def cell_rows(configs, budget_s):
    rows = []
    for name, T, B, D, H in configs:
        cell = jb.lru(H, 0.9, 0.999) if name == "lru" else jb.mingru(H)
        params = cell.init(jax.random.key(0), D)
        carry = cell.initial_carry((B,))
        xs = jax.random.normal(jax.random.key(1), (T, B, D))
        targets = jax.random.normal(jax.random.key(2), (T, B, D if name == "lru" else H))

        def total(form):
            def loss(params, carry, xs, targets):
                return jnp.sum(jax.vmap(_mse)(form(params, carry, xs)[1], targets))

            return jax.value_and_grad(loss)

        sequential = lambda p, c, x: lax.scan(lambda h, x_: cell.step(p, h, x_), c, x)
        fns = {"jax.grad(lax.scan)": total(sequential), "jaxbptt engine": jb.value_and_grad(cell.step, _mse),
               "parallel fwd+bwd": total(cell.parallel)}
        ms = _interleaved(fns, (params, carry, xs, targets), budget_s)
        rows.append(dict(cell=name, T=T, B=B, D=D, H=H, ms=ms,
                         speedup=ms["jax.grad(lax.scan)"] / ms["parallel fwd+bwd"]))
    return rows


def deer_rows(configs, budget_s):
    rows = []
    for name, T, B, D, H in configs:
        cell = jb.elman(H) if name == "elman" else jb.gru(H)
        params = cell.init(jax.random.key(0), D)
        carry = cell.initial_carry((B,))
        xs = jax.random.normal(jax.random.key(1), (T, B, D))

        def sequential(p, c, x):
            return lax.scan(lambda h, x_: cell.step(p, h, x_), c, x)

        def solver(quasi):
            deer = lambda p, c, x: jb.deer(cell.step, p, c, x, quasi=quasi, return_info=True)
            return jax.vmap(deer, in_axes=(None, 0, 1), out_axes=(0, 1, 0))

        def grad_of(solve):
            return jax.grad(lambda p, c, x: jnp.sum(jnp.square(solve(p, c, x)[1])))

        deer_b, quasi_b = solver(False), solver(True)
        iters = {m: int(jnp.max(s(params, carry, xs)[2].iterations)) for m, s in (("DEER", deer_b), ("quasi-DEER", quasi_b))}
        fns = {"lax.scan fwd": sequential, "DEER fwd": deer_b, "quasi-DEER fwd": quasi_b,
               "jax.grad(lax.scan)": grad_of(sequential), "DEER fwd+bwd": grad_of(deer_b),
               "quasi-DEER fwd+bwd": grad_of(quasi_b)}
        ms = _interleaved(fns, (params, carry, xs), budget_s)
        rows.append(dict(cell=name, T=T, B=B, D=D, H=H, ms=ms, iterations=iters))
    return rows


def _print_header(title, methods, keys):
    print(f"\n== {title}")
    print(" ".join(f"{k:>6s}" for k in keys) + "".join(f" {m:>20s}" for m in methods) + "   (ms)", flush=True)


def _print_row(r, keys):
    line = " ".join(f"{r[k]!s:>6s}" for k in keys) + "".join(f" {ms:20.2f}" for ms in r["ms"].values())
    extra = [f"{k} {r[k]:.2f}x" for k in ("fwd_speedup", "grad_speedup", "speedup") if k in r]
    if "iterations" in r:
        extra.append("iterations " + ", ".join(f"{m} {n}" for m, n in r["iterations"].items()))
    print(line + "   " + "; ".join(extra), flush=True)


TABLES = (
    ("linear_scan", "scan", linear_scan_rows, ("T", "B", "H"),
     ("lax.scan fwd", "linear_scan fwd", "jax.grad(lax.scan)", "jaxbptt engine", "linear_scan fwd+bwd",
      "associative fwd+bwd", "chunked fwd+bwd"),
     "linear_scan: h_t = a_t h_{t-1} + b_t, loss sum(h^2); speedup = lax.scan time / linear_scan time"),
    ("cells", "cells", cell_rows, ("cell", "T", "B", "D", "H"),
     ("jax.grad(lax.scan)", "jaxbptt engine", "parallel fwd+bwd"),
     "cells, per-step MSE loss and parameter gradients; speedup = jax.grad(lax.scan) / parallel"),
    ("deer", "deer", deer_rows, ("cell", "T", "B", "D", "H"),
     ("lax.scan fwd", "DEER fwd", "quasi-DEER fwd", "jax.grad(lax.scan)", "DEER fwd+bwd", "quasi-DEER fwd+bwd"),
     "DEER / quasi-DEER (default tol; batch by jax.vmap), against lax.scan"),
)


def run(*, smoke: bool = False, budget_s: float = 1.5) -> dict:
    """Measure and print the three tables, a row as soon as it is measured; return them as a dict."""
    sizes = SMOKE if smoke else FULL
    print(f"device {device_name()}, float32; suite parallel{' (smoke sizes)' if smoke else ''}", flush=True)
    report = {"device": device_name(), "suite": "parallel"}
    for name, sizes_key, measure, keys, methods, title in TABLES:
        _print_header(title, methods, keys)
        report[name] = []
        for config in sizes[sizes_key]:
            row = measure([config], budget_s)[0]
            _print_row(row, keys)
            report[name].append(row)
    return report

