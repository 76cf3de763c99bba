"""Measurement: compile, warm up, time interleaved calls, read memory, compare gradients with a
float64 oracle, and count FLOP/s against this machine's measured matrix-product peak."""

from __future__ import annotations

import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ._methods import Bound, oracle
from ._problems import Problem, step_flop


def device_name() -> str:
    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', d.platform)}"


def relative_error(grads, reference) -> float:
    """The largest ||g - g_ref|| / ||g_ref|| over gradient leaves (matched in order)."""
    errors = []
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(reference)):
        g, r = np.asarray(g, np.float64), np.asarray(r, np.float64)
        errors.append(np.linalg.norm(g - r) / max(np.linalg.norm(r), 1e-300))
    return float(max(errors))


def matmul_peak_gflops(n: int | None = None) -> float:
    """This machine's float32 matrix-product rate (GFLOP/s), measured on a large square product."""
    n = n or (4096 if jax.devices()[0].platform == "gpu" else 2048)
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    jax.block_until_ready(f(a))
    best = min(_time(lambda: jax.block_until_ready(f(a))) for _ in range(5))
    return 2 * n**3 / best / 1e9


def model_gflop(problem: Problem) -> float:
    """Matrix-product GFLOP of one training step (forward, then two products per forward one), from
    the model's own step."""
    return 3 * problem.T * step_flop(problem) / 1e9


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _prepare(name: str, bound: Bound):
    """A timed callable, compile seconds, memory bytes and gradients (the warm-up call's)."""
    if bound.kind == "torch":
        import torch

        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        grads = bound.run()
        compile_s = time.perf_counter() - start
        memory = int(torch.cuda.max_memory_allocated()) if cuda else None
        return bound.run, compile_s, memory, [g.detach().cpu().numpy() for g in grads]
    start = time.perf_counter()
    compiled = jax.jit(bound.run).lower(*bound.args).compile()
    compile_s = time.perf_counter() - start
    _, grads = jax.block_until_ready(compiled(*bound.args))
    analysis = compiled.memory_analysis()
    memory = int(analysis.temp_size_in_bytes) if analysis is not None else None
    return (lambda: jax.block_until_ready(compiled(*bound.args))), compile_s, memory, grads


def measure(problem: Problem, builders: dict[str, Callable], *, budget_s: float = 3.0, max_repeats: int = 60,
            peak_gflops: float | None = None, skipped: dict | None = None, baseline: str | None = None) -> list[dict]:
    """One row per method: median time and spread, compile time, memory, gradient error, FLOP/s.
    Methods whose library is missing are left out and their reason recorded in `skipped`.

    With `baseline` (a method among `builders`), the methods compared with the problem's float64
    oracle are compared with the baseline's gradients instead, and the oracle is not compiled: a
    cheaper check of the same gradients, for runs that measure nothing worth reading."""
    reference = oracle(problem)
    calls, rows, kinds, compared = {}, {}, {}, {}
    for name, build in builders.items():
        try:
            bound = build(problem, reference)
        except ImportError as err:
            if skipped is not None:
                skipped[name] = str(err)
            continue
        calls[name], compile_s, memory, grads = _prepare(name, bound)
        kinds[name] = bound.kind
        compared[name] = (grads, bound.oracle)
        rows[name] = {
            "device": device_name(), "dtype": str(jax.tree.leaves(problem.xs)[0].dtype), "cell": problem.cell,
            "T": problem.T, "B": problem.B, "D": problem.D, "H": problem.H, "method": name,
            "compile_s": compile_s, "temp_bytes": memory,
            "times": [],
        }
    against_baseline = baseline in compared and compared[baseline][1] is reference
    for name, (grads, method_oracle) in compared.items():
        if against_baseline and method_oracle is reference:
            error = relative_error(grads, compared[baseline][0]) if name != baseline else None
        else:
            error = relative_error(grads, method_oracle()) if method_oracle is not None else None
        rows[name]["grad_rel_err"] = error
    first = sum(_time(call) for call in calls.values())
    # Up to 60 rounds: calls of a few ms vary by 10-30% one by one on a shared CPU, and the budget
    # still bounds the total.
    repeats = int(min(max_repeats, max(3, budget_s / max(first, 1e-9))))
    # JAX methods are interleaved, rotating the order to spread drift evenly; PyTorch's are timed
    # after them, since its OpenMP threads keep spinning after a call and would slow the next one.
    names = [n for n in calls if kinds[n] == "jax"]
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            rows[name]["times"].append(_time(calls[name]))
    for name in (n for n in calls if kinds[n] != "jax"):
        rows[name]["times"] = [_time(calls[name]) for _ in range(repeats)]
    gflop = model_gflop(problem)
    out = []
    for row in rows.values():
        times = np.asarray(row.pop("times"))
        median = float(np.median(times))
        row.update(time_ms=median * 1e3, p25_ms=float(np.percentile(times, 25) * 1e3),
                   p75_ms=float(np.percentile(times, 75) * 1e3), repeats=len(times),
                   gflops=gflop / median, peak_fraction=(gflop / median / peak_gflops) if peak_gflops else None)
        out.append(row)
    return out
