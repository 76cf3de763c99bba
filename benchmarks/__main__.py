"""`python -m benchmarks`: jaxbptt side by side with `jax.grad` through `lax.scan`.

For every configuration (cell, T, B, D, H) each method computes the loss and the parameter
gradients of the same step and per-step MSE loss on the same float32 data. Rows report the median
time of one jit-compiled call (with the interquartile range), compile time, XLA temp memory and
the gradient's relative error against a float64 autodiff oracle; each section's summary divides
every method's time and memory by those of the section's baseline, measured side by side in the
same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import jax

jax.config.update("jax_enable_x64", True)  # for the float64 oracle; benchmark data is float32

from ._harness import device_name, matmul_peak_gflops, measure  # noqa: E402
from ._methods import METHODS  # noqa: E402
from ._problems import OUTPUT_SIZE, USER_STEPS, make_problem  # noqa: E402
from ._suites import SUITE_EXTRAS, SUITES, smoke_configs  # noqa: E402


class _NoBar:
    def update(self, n=1):
        pass

    def close(self):
        pass


def _progress(total: int, **kwargs):
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is in the `bench` extra; without it, no bar
        return _NoBar()
    return tqdm(total=total, file=sys.stderr, **kwargs)


def _parse(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=sorted(SUITES), default="default")
    parser.add_argument("--quick", action="store_const", const="quick", dest="suite", help="same as --suite quick")
    parser.add_argument("--cell", action="append", help="only these cells (repeatable)")
    parser.add_argument("--method", action="append", help="only these methods (each section's baseline always runs)")
    parser.add_argument("--size", action="append", help="only these sizes, as T,B,D,H (repeatable)")
    parser.add_argument("--json", metavar="PATH", help="also write rows and summaries as JSON")
    parser.add_argument("--plot", metavar="PATH", help="plot time and memory against T per method (PNG)")
    parser.add_argument("--budget", type=float, default=1.5, help="seconds of timed calls per configuration")
    parser.add_argument("--smoke", action="store_true",
                        help="every configuration at a tiny size and every extra measurement shrunk: checks that "
                             "each section and method runs (in seconds), measures nothing worth reading")
    args = parser.parse_args(argv)
    if args.smoke:
        args.budget = 0.0
    return args


def _selected(section, args):
    configs = smoke_configs(section.configs) if args.smoke else section.configs
    if args.cell:
        configs = [c for c in configs if c[0] in args.cell]
    if args.size:
        sizes = {tuple(int(v) for v in s.split(",")) for s in args.size}
        configs = [c for c in configs if tuple(c[1:]) in sizes]
    methods = [m for m in section.methods if m == section.baseline or not args.method or m in args.method]
    return configs, methods


# `--smoke` runs every section at one tiny size, so the sections and suites run in one process meet
# the same (configuration, method) pairs again: the same program on the same data, measured once.
_SMOKE_MEASURED: dict = {}


def _measured(config, methods, baseline, args, peak, skipped) -> list[dict]:
    """`measure` of the methods on one configuration, in the methods' order; a method whose library is
    missing is left out and its reason recorded in `skipped`. Under `--smoke` the gradients are
    compared with the baseline's rather than with a float64 oracle compiled for each configuration."""
    done = _SMOKE_MEASURED if args.smoke else {}
    todo = [m for m in methods if (config, m) not in done]
    if todo:
        why = {}
        fresh = measure(make_problem(*config), {m: METHODS[m] for m in todo}, budget_s=args.budget,
                        peak_gflops=peak, skipped=why, baseline=baseline if args.smoke else None)
        done.update({(config, r["method"]): r for r in fresh})
        done.update({(config, m): reason for m, reason in why.items()})
    rows = []
    for m in methods:
        if isinstance(done[(config, m)], str):
            skipped[m] = done[(config, m)]
        else:
            rows.append(dict(done[(config, m)]))
    return rows


def _fmt(value, spec, missing="-"):
    return format(value, spec) if value is not None else missing


def _print_rows(rows):
    print(f"{'cell':7s} {'T':>6s} {'B':>4s} {'D':>5s} {'H':>5s} {'method':>14s} {'time ms':>10s} {'IQR ms':>8s} "
          f"{'compile s':>9s} {'memory MB':>9s} {'grad err':>9s} {'GFLOP/s':>8s} {'of peak':>7s}")
    for r in rows:
        mem = r["temp_bytes"] / 1e6 if r["temp_bytes"] is not None else None
        print(f"{r['cell']:7s} {r['T']:6d} {r['B']:4d} {r['D']:5d} {r['H']:5d} {r['method']:>14s} "
              f"{r['time_ms']:10.2f} {r['p75_ms'] - r['p25_ms']:8.2f} {r['compile_s']:9.2f} {_fmt(mem, '9.1f'):>9s} "
              f"{_fmt(r['grad_rel_err'], '9.1e'):>9s} {r['gflops']:8.1f} {_fmt(r['peak_fraction'], '7.1%'):>7s}")


def summarize(rows, baseline):
    """Ratios of every method to `baseline`, per configuration and aggregated per method and group."""
    by_config = {}
    for r in rows:
        by_config.setdefault((r["cell"], r["T"], r["B"], r["D"], r["H"]), {})[r["method"]] = r
    ratios = []
    for config, methods in by_config.items():
        base = methods.get(baseline)
        for name, r in methods.items():
            if name == baseline or base is None:
                continue
            mem = r["temp_bytes"] / base["temp_bytes"] if r["temp_bytes"] and base["temp_bytes"] else None
            ratios.append(dict(zip(("cell", "T", "B", "D", "H"), config), method=name,
                               time_ratio=r["time_ms"] / base["time_ms"], memory_ratio=mem))
    aggregate = {}
    for name in dict.fromkeys(r["method"] for r in ratios):
        for group, keep in (("built-in cells", lambda r: r["cell"] not in USER_STEPS),
                            ("user steps", lambda r: r["cell"] in USER_STEPS)):
            chosen = [r for r in ratios if r["method"] == name and keep(r)]
            if chosen:
                times = [r["time_ratio"] for r in chosen]
                mems = [r["memory_ratio"] for r in chosen if r["memory_ratio"] is not None]
                aggregate[f"{name} / {baseline}, {group}"] = {
                    "configs": len(chosen), "median_time_ratio": statistics.median(times), "max_time_ratio": max(times),
                    "median_memory_ratio": statistics.median(mems) if mems else None,
                }
    return ratios, aggregate


def _print_summary(ratios, aggregate, baseline):
    print(f"\nRatios to {baseline} (below 1: faster / less memory):")
    print(f"{'cell':7s} {'T':>6s} {'B':>4s} {'D':>5s} {'H':>5s} {'method':>14s} {'time':>7s} {'memory':>7s}")
    for r in ratios:
        print(f"{r['cell']:7s} {r['T']:6d} {r['B']:4d} {r['D']:5d} {r['H']:5d} {r['method']:>14s} "
              f"{r['time_ratio']:7.2f} {_fmt(r['memory_ratio'], '7.2f'):>7s}")
    _print_aggregate(aggregate)


def _print_aggregate(aggregate):
    for key, a in aggregate.items():
        print(f"  {key:42s} {a['configs']:2d} configs: time median {a['median_time_ratio']:.2f}, "
              f"max {a['max_time_ratio']:.2f}; memory median {_fmt(a['median_memory_ratio'], '.2f')}")


def _print_exact_bptt_summary(report) -> None:
    """jaxbptt against jax.grad over every configuration of the run that has both, each pair from the
    section that measured them side by side."""
    rows = [r for section in report["sections"] if section["baseline"] == "jax.grad"
            for r in section["rows"] if r["method"] in ("jax.grad", "jaxbptt")]
    ratios, aggregate = summarize(rows, "jax.grad")
    if ratios:
        print("\n== exact BPTT, all sections: jaxbptt / jax.grad through lax.scan")
        _print_aggregate(aggregate)
        report["exact_bptt"] = {"ratios": ratios, "summary": aggregate}


def _against_the_faster(rows) -> list[dict]:
    """Per configuration timed with jax.grad, jax.checkpoint and jaxbptt: jaxbptt's time against the
    faster of the two autodiff baselines, its memory against jax.grad's, and whether the checkpointed
    scan dominates it (both faster and at least 2x leaner)."""
    by_config = {}
    for r in rows:
        by_config.setdefault((r["cell"], r["T"], r["B"], r["D"], r["H"]), {})[r["method"]] = r
    out = []
    for config, m in by_config.items():
        if not {"jax.grad", "jax.checkpoint", "jaxbptt"} <= m.keys():
            continue
        grad, ckpt, ours = m["jax.grad"], m["jax.checkpoint"], m["jaxbptt"]
        out.append(dict(zip(("cell", "T", "B", "D", "H"), config),
                        vs_faster=ours["time_ms"] / min(grad["time_ms"], ckpt["time_ms"]),
                        vs_grad=ours["time_ms"] / grad["time_ms"],
                        memory=ours["temp_bytes"] / grad["temp_bytes"] if ours["temp_bytes"] and grad["temp_bytes"]
                        else None,
                        dominated=bool(ckpt["time_ms"] < ours["time_ms"] and ckpt["temp_bytes"] is not None
                                       and ours["temp_bytes"] is not None
                                       and 2 * ckpt["temp_bytes"] <= ours["temp_bytes"])))
    if out:
        print("\njaxbptt against the faster of jax.grad and jax.checkpoint (time), and jax.grad (memory):")
        for r in out:
            print(f"{r['cell']:9s} {r['T']:6d} {r['B']:4d} {r['D']:5d} {r['H']:5d}  time vs faster {r['vs_faster']:5.2f}"
                  f"  vs jax.grad {r['vs_grad']:5.2f}  memory {_fmt(r['memory'], '5.2f')}"
                  + ("  DOMINATED by jax.checkpoint" if r["dominated"] else ""))
        print(f"  median time vs jax.grad {statistics.median(r['vs_grad'] for r in out):.2f}, max time vs the faster "
              f"{max(r['vs_faster'] for r in out):.2f}, max memory {max((r['memory'] or 0) for r in out):.2f}, "
              f"dominated {sum(r['dominated'] for r in out)} of {len(out)}")
    return out


def _best_unroll(rows) -> list[str]:
    """When a section times jaxbptt at several unroll values, the fastest per configuration."""
    lines = []
    by_config = {}
    for r in rows:
        if r["method"] == "jaxbptt" or r["method"].startswith("jaxbptt u="):
            by_config.setdefault((r["cell"], r["T"], r["B"], r["D"], r["H"]), []).append(r)
    for config, rs in by_config.items():
        if len(rs) > 1:
            best = min(rs, key=lambda r: r["time_ms"])
            unroll = best["method"].split("u=")[1] if "u=" in best["method"] else "1"
            lines.append(f"  best unroll for {config}: {unroll} ({best['time_ms']:.2f} ms; "
                         f"{best['time_ms'] / best['T'] * 1e3:.1f} us per step)")
    return lines


def _online(args):
    from ._online import SMOKE, online_memory, print_online

    return online_memory(**(SMOKE if args.smoke else {})), print_online


def _sweep(args):
    from ._sweep import SMOKE, print_sweep, sweep_timing

    return sweep_timing(**(SMOKE if args.smoke else {})), print_sweep


def _online_methods(args):
    from ._online_methods import online_methods, print_online_methods
    from ._suites import ONLINE_METHOD_CONFIGS, ONLINE_METHOD_TINY

    return online_methods(ONLINE_METHOD_TINY if args.smoke else ONLINE_METHOD_CONFIGS), print_online_methods


def _parallel_time(args):
    from ._parallel_time import run

    return run(smoke=args.smoke, budget_s=args.budget), lambda report: None  # it prints rows as they come


def _sharded_sweep(args):
    from ._sharded_sweep import print_sharded_sweep, sharded_sweep_timing

    return sharded_sweep_timing(devices=(2,) if args.smoke else (1, 2, 4)), print_sharded_sweep


# The extra measurements a suite may name in `SUITE_EXTRAS`: name -> run(args) -> (result, printer).
EXTRAS = {"online": _online, "sweep": _sweep, "online_methods": _online_methods, "parallel": _parallel_time,
          "sharded_sweep": _sharded_sweep}


def main(argv=None):
    args = _parse(argv)
    sections = [(s, *_selected(s, args)) for s in SUITES[args.suite]]
    total = sum(len(configs) for _, configs, _ in sections)
    peak = matmul_peak_gflops(256 if args.smoke else None)
    print(f"device {device_name()} (float32 matrix-product peak measured now: {peak:.0f} GFLOP/s), float32 data, "
          f"loss: per-step MSE of a {OUTPUT_SIZE}-unit readout; suite {args.suite}: {total} configurations", flush=True)
    report = {"device": device_name(), "suite": args.suite, "peak_gflops": peak, "sections": []}
    bar = _progress(total, desc="benchmarks", unit="config")
    for section, configs, methods in sections:
        rows, skipped = [], {}
        for config in configs:
            rows += _measured(config, methods, section.baseline, args, peak, skipped)
            bar.update(1)
        if not rows:
            continue
        print(f"\n== {section.name}: {section.note}")
        _print_rows(rows)
        for name, why in skipped.items():
            print(f"  skipped {name}: {why}")
        ratios, aggregate = summarize(rows, section.baseline)
        _print_summary(ratios, aggregate, section.baseline)
        best = _best_unroll(rows)
        for line in best:
            print(line)
        faster = _against_the_faster(rows)
        report["sections"].append({"name": section.name, "baseline": section.baseline, "rows": rows,
                                   "ratios": ratios, "summary": aggregate, "skipped": skipped,
                                   "best_unroll": best, "against_the_faster": faster})
    bar.close()
    _print_exact_bptt_summary(report)
    if not (args.cell or args.size or args.method):
        for name in SUITE_EXTRAS.get(args.suite, ()):
            report[name], show = EXTRAS[name](args)
            show(report[name])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    if args.plot:
        from ._plot import plot_scaling

        rows = [r for section in report["sections"] for r in section["rows"]]
        print(f"plot: {args.plot}" if plot_scaling(rows, args.plot) else "plot: no configuration was run at two lengths")
    return report


if __name__ == "__main__":
    main()
