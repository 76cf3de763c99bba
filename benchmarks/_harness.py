"""Measurement: compile, warm up, time interleaved calls, read XLA's temp memory, and compare
gradients with a float64 oracle."""

from __future__ import annotations

import time
from typing import Callable

import jax
import numpy as np

from ._methods import autodiff
from ._problems import Problem, as_float64


def device_name() -> str:
    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', d.platform)}"


def relative_error(grads, reference) -> float:
    """The largest ||g - g_ref|| / ||g_ref|| over gradient leaves."""
    errors = []
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(reference)):
        g, r = np.asarray(g, np.float64), np.asarray(r, np.float64)
        errors.append(np.linalg.norm(g - r) / max(np.linalg.norm(r), 1e-300))
    return float(max(errors))


def oracle_grads(problem: Problem):
    """Float64 gradients of plain autodiff through lax.scan (needs jax_enable_x64)."""
    p = as_float64(problem)
    return jax.jit(autodiff(p.step))(p.params, p.carry, p.xs, p.targets)[1]


def measure(problem: Problem, builders: dict[str, Callable], *, budget_s: float = 4.0, max_repeats: int = 15,
            reference=None, exact=None) -> list[dict]:
    """One row per method: median step time, spread, compile time, temp memory, and the gradient
    error against `reference` for the methods in `exact` (all when None)."""
    args = (problem.params, problem.carry, problem.xs, problem.targets)
    compiled, rows = {}, {}
    for name, build in builders.items():
        start = time.perf_counter()
        compiled[name] = jax.jit(build(problem)).lower(*args).compile()
        compile_s = time.perf_counter() - start
        _, grads = jax.block_until_ready(compiled[name](*args))  # warm-up
        grads = grads[0] if isinstance(grads, tuple) else grads  # (grads, diag) with diagnostics
        memory = compiled[name].memory_analysis()
        rows[name] = {
            "device": device_name(), "dtype": str(problem.xs.dtype), "cell": problem.cell,
            "T": problem.T, "B": problem.B, "D": problem.D, "H": problem.H, "method": name,
            "compile_s": compile_s,
            "temp_bytes": int(memory.temp_size_in_bytes) if memory is not None else None,
            "grad_rel_err": relative_error(grads, reference)
            if reference is not None and (exact is None or name in exact) else None,
            "times": [],
        }
    first = {}
    for name, fn in compiled.items():
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        first[name] = time.perf_counter() - start
    repeats = int(min(max_repeats, max(3, budget_s / max(sum(first.values()), 1e-9))))
    names = list(compiled)
    for r in range(repeats):  # interleaved, rotating the order to spread drift evenly
        for name in names[r % len(names):] + names[: r % len(names)]:
            start = time.perf_counter()
            jax.block_until_ready(compiled[name](*args))
            rows[name]["times"].append(time.perf_counter() - start)
    out = []
    for row in rows.values():
        times = np.asarray(row.pop("times"))
        row.update(time_ms=float(np.median(times) * 1e3), p25_ms=float(np.percentile(times, 25) * 1e3),
                   p75_ms=float(np.percentile(times, 75) * 1e3), repeats=len(times))
        out.append(row)
    return out
