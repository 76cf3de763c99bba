"""`python -m benchmarks`: jaxbptt side by side with `jax.grad` through `lax.scan`.

For every configuration (cell, T, B, D, H) each method computes the loss and the parameter
gradients of the same step and per-step MSE loss on the same float32 data. Rows report the median
time of one jit-compiled call (with the interquartile range), compile time, XLA temp memory and
the gradient's relative error against a float64 autodiff oracle; the summary gives jaxbptt's
time and memory as ratios of `jax.grad`'s, measured side by side in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import jax

jax.config.update("jax_enable_x64", True)  # for the float64 oracle; benchmark data is float32

from ._harness import device_name, measure, oracle_grads  # noqa: E402
from ._methods import BASELINE, METHODS  # noqa: E402
from ._problems import make_problem  # noqa: E402
from ._suites import SUITES  # noqa: E402


def _progress(items, **kwargs):
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is in the `bench` extra; without it, no bar
        return items
    return tqdm(items, file=sys.stderr, **kwargs)


def _parse(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=sorted(SUITES), default="default")
    parser.add_argument("--quick", action="store_const", const="quick", dest="suite", help="same as --suite quick")
    parser.add_argument("--cell", action="append", help="only these cells (repeatable)")
    parser.add_argument("--method", action="append", help=f"only these methods (the baseline {BASELINE} always runs)")
    parser.add_argument("--size", action="append", help="only these sizes, as T,B,D,H (repeatable)")
    parser.add_argument("--json", metavar="PATH", help="also write rows and summary as JSON")
    parser.add_argument("--budget", type=float, default=3.0, help="seconds of timed calls per configuration")
    return parser.parse_args(argv)


def _configs(args):
    configs = SUITES[args.suite]
    if args.cell:
        configs = [c for c in configs if c[0] in args.cell]
    if args.size:
        sizes = {tuple(int(v) for v in s.split(",")) for s in args.size}
        configs = [c for c in configs if tuple(c[1:]) in sizes]
    return configs


def _print_rows(rows):
    print(f"{'cell':7s} {'T':>6s} {'B':>4s} {'D':>5s} {'H':>5s} {'method':>10s} {'time ms':>10s} {'IQR ms':>9s} "
          f"{'compile s':>9s} {'temp MB':>9s} {'grad err':>9s}")
    for r in rows:
        err = f"{r['grad_rel_err']:.1e}" if r["grad_rel_err"] is not None else "-"
        mem = f"{r['temp_bytes'] / 1e6:.1f}" if r["temp_bytes"] is not None else "-"
        print(f"{r['cell']:7s} {r['T']:6d} {r['B']:4d} {r['D']:5d} {r['H']:5d} {r['method']:>10s} "
              f"{r['time_ms']:10.2f} {r['p75_ms'] - r['p25_ms']:9.2f} {r['compile_s']:9.2f} {mem:>9s} {err:>9s}")


def summarize(rows):
    """Ratios of every method to the baseline, per configuration and aggregated."""
    by_config = {}
    for r in rows:
        by_config.setdefault((r["cell"], r["T"], r["B"], r["D"], r["H"]), {})[r["method"]] = r
    ratios = []
    for config, methods in by_config.items():
        base = methods.get(BASELINE)
        for name, r in methods.items():
            if name == BASELINE or base is None:
                continue
            mem = r["temp_bytes"] / base["temp_bytes"] if r["temp_bytes"] and base["temp_bytes"] else None
            ratios.append({"cell": config[0], "T": config[1], "B": config[2], "D": config[3], "H": config[4],
                           "method": name, "time_ratio": r["time_ms"] / base["time_ms"], "memory_ratio": mem})
    aggregate = {}
    for name in sorted({r["method"] for r in ratios}):
        for group, members in (("built-in cells", lambda r: r["cell"] != "custom"), ("custom step", lambda r: r["cell"] == "custom")):
            chosen = [r for r in ratios if r["method"] == name and members(r)]
            if not chosen:
                continue
            times = [r["time_ratio"] for r in chosen]
            mems = [r["memory_ratio"] for r in chosen if r["memory_ratio"] is not None]
            aggregate[f"{name} / {group}"] = {
                "configs": len(chosen), "median_time_ratio": statistics.median(times), "max_time_ratio": max(times),
                "median_memory_ratio": statistics.median(mems) if mems else None,
            }
    return ratios, aggregate


def _print_summary(ratios, aggregate):
    print(f"\nRatios to {BASELINE} through lax.scan (below 1: faster / less memory):")
    print(f"{'cell':7s} {'T':>6s} {'B':>4s} {'D':>5s} {'H':>5s} {'method':>10s} {'time':>7s} {'memory':>7s}")
    for r in ratios:
        mem = f"{r['memory_ratio']:.2f}" if r["memory_ratio"] is not None else "-"
        print(f"{r['cell']:7s} {r['T']:6d} {r['B']:4d} {r['D']:5d} {r['H']:5d} {r['method']:>10s} "
              f"{r['time_ratio']:7.2f} {mem:>7s}")
    print()
    for key, a in aggregate.items():
        mem = f"{a['median_memory_ratio']:.2f}" if a["median_memory_ratio"] is not None else "-"
        print(f"{key:32s} {a['configs']:2d} configs: time median {a['median_time_ratio']:.2f}, "
              f"max {a['max_time_ratio']:.2f}; memory median {mem}")


def main(argv=None):
    args = _parse(argv)
    methods = {k: v for k, v in METHODS.items() if k == BASELINE or not args.method or k in args.method}
    configs = _configs(args)
    print(f"device {device_name()}, float32, loss: per-step MSE of a {10}-unit readout, "
          f"{len(configs)} configurations, methods {list(methods)}", flush=True)
    rows = []
    for cell, T, B, D, H in _progress(configs, desc="benchmarks", unit="config"):
        problem = make_problem(cell, T, B, D, H)
        rows += measure(problem, methods, budget_s=args.budget, reference=oracle_grads(problem))
    _print_rows(rows)
    ratios, aggregate = summarize(rows)
    _print_summary(ratios, aggregate)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device_name(), "rows": rows, "ratios": ratios, "summary": aggregate}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
