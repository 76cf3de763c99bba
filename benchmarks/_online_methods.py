"""Online gradient methods against the sequential BPTT engine: time per step and XLA temp memory of
one compiled gradient of the same model, loss and sequence, measured side by side (interleaved)."""

from __future__ import annotations

import statistics

import jax

import jaxbptt as jb

from ._harness import _time, device_name
from ._problems import make_problem, mse

# the evolution strategies with 8 antithetic pairs: 17 forward runs, no backward pass
METHODS = {"BPTT": None, "TBPTT(10)": jb.TBPTT(10, 10), "UORO": jb.UORO(), "SnAp-1": jb.SnAp(1),
           "SnAp-2": jb.SnAp(2), "RTRL": jb.RTRL(), "ES x8": jb.ES(0.01, pairs=8),
           "PES x8": jb.PES(0.01, pairs=8, window=10), "NRES x8": jb.NRES(0.01, pairs=8, window=10)}


def _compiled(problem, method):
    if method is None:
        fn = jb.value_and_grad(problem.step, mse)
        run = lambda p, c, x, t, k: fn(p, c, x, t)
    else:
        run = jb.online_grad(problem.step, mse, method, max_influence_bytes=2**31)
    args = (problem.params, problem.carry, problem.xs, problem.targets, jax.random.key(0))
    compiled = jax.jit(run).lower(*args).compile()
    analysis = compiled.memory_analysis()
    return (lambda: jax.block_until_ready(compiled(*args))), int(analysis.temp_size_in_bytes) if analysis else None


def online_methods(configs, repeats: int = 5) -> list[dict]:
    """One row per (configuration, method): median ms per step over `repeats` interleaved calls and
    temp bytes; `configs` are (cell, T, B, D, H) tuples."""
    rows = []
    for cell, T, B, D, H in configs:
        problem = make_problem(cell, T, B, D, H)
        calls, memory = {}, {}
        for name, method in METHODS.items():
            calls[name], memory[name] = _compiled(problem, method)
            calls[name]()
        times = {name: [] for name in calls}
        for r in range(repeats):
            names = list(calls)
            for name in names[r % len(names):] + names[: r % len(names)]:
                times[name].append(_time(calls[name]))
        for name in calls:
            rows.append({"device": device_name(), "cell": cell, "T": T, "B": B, "D": D, "H": H, "method": name,
                         "ms_per_step": 1e3 * statistics.median(times[name]) / T, "temp_bytes": memory[name]})
    return rows


def print_online_methods(rows) -> None:
    print("\n== online gradients: ms per step and XLA temp memory of one compiled gradient, ratios to "
          "jaxbptt's exact BPTT (value_and_grad) on the same problem, float32")
    print(f"{'cell':6s} {'T':>5s} {'B':>3s} {'D':>4s} {'H':>4s} {'method':>10s} {'ms/step':>9s} {'x BPTT':>8s} "
          f"{'temp MB':>8s} {'x BPTT':>8s}")
    base = {}
    for r in rows:
        config = (r["cell"], r["T"], r["B"], r["D"], r["H"])
        if r["method"] == "BPTT":
            base[config] = r
        b = base[config]
        mem_ratio = r["temp_bytes"] / b["temp_bytes"] if r["temp_bytes"] and b["temp_bytes"] else float("nan")
        print(f"{r['cell']:6s} {r['T']:5d} {r['B']:3d} {r['D']:4d} {r['H']:4d} {r['method']:>10s} "
              f"{r['ms_per_step']:9.3f} {r['ms_per_step'] / b['ms_per_step']:8.1f} "
              f"{(r['temp_bytes'] or 0) / 1e6:8.2f} {mem_ratio:8.1f}")
