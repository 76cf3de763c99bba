"""`--suite parallel`: parallel-in-time forms against the sequential loop, side by side in one run.

Three tables, every time the median of interleaved calls of jit-compiled functions (float32 data):
1. `jaxbptt.linear_scan` (forward, and forward + backward; `method="auto"`, sequential on a CPU)
   against `lax.scan` of the same recurrence, `jax.grad` through it, the sequential engine
   (`jaxbptt.value_and_grad` of the one-step recurrence, gradients with respect to `h0`, `a`, `b`),
   and `linear_scan(method="associative")` and `method="chunked"` forward + backward;
2. LRU and minGRU training steps (per-step MSE loss): `cell.parallel` under `jax.grad`, the
   sequential engine `jaxbptt.value_and_grad(cell.step)`, and `jax.grad` through `lax.scan`;
3. DEER and quasi-DEER on Elman and GRU cells (batch mapped with `jax.vmap`): Newton iterations
   and forward time against `lax.scan`, and forward + backward against `jax.grad` through it;
4. time split over host devices: an LRU training step (loss and gradients of `cell.parallel`) on one
   device against the same step with `axis_name=` inside `jax.shard_map` over 8 host devices, time
   and per-device temp memory. The device count is fixed when JAX starts, so each row runs in its
   own process (`python -m benchmarks._parallel_time T B D H DEVICES BUDGET` prints it as JSON).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import jax
import jax.numpy as jnp
from jax import lax

import jaxbptt as jb

from ._harness import _time, device_name

FULL = {"scan": [(T, 8, 256) for T in (1000, 10_000, 30_000)],  # 10^5: 16 GB resident, too much for a shared machine
        "cells": [(cell, T, 8, 64, 256) for cell in ("lru", "mingru") for T in (1000, 10_000)],
        "deer": [(cell, T, 8, 2, 16) for cell in ("elman", "gru") for T in (1000, 10_000)],
        "sharded": [(T, 1, 16, 256, 8) for T in (10_000, 100_000, 1_000_000)]}
SMOKE = {"scan": [(64, 2, 8)], "cells": [("lru", 64, 2, 3, 8), ("mingru", 64, 2, 3, 8)],
         "deer": [("elman", 16, 2, 2, 4)],  # DEER's code is the same for every step
         "sharded": [(64, 1, 3, 8, 8)]}


def _interleaved(fns: dict, args, budget_s: float, max_repeats: int = 15, *, compiled: dict | None = None) -> dict:
    """Median ms of each jit-compiled function, its calls interleaved (after one warm-up call each);
    `compiled` maps names to already compiled functions and their own arguments instead."""
    if compiled is None:
        compiled = {name: (jax.jit(fn).lower(*args).compile(), args) for name, fn in fns.items()}
    calls = {name: (lambda c=c, a=a: jax.block_until_ready(c(*a))) for name, (c, a) in compiled.items()}
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


def _split_training_step(T, B, D, H, devices, budget_s):
    """One row of table 4, measured in this process (which must have `devices` devices)."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    mesh = jax.make_mesh((devices,), ("time",), axis_types=(jax.sharding.AxisType.Auto,))
    cell = jb.lru(H, 0.9, 0.999)
    params, carry = cell.init(jax.random.key(0), D), cell.initial_carry((B,))
    xs, targets = (jax.random.normal(jax.random.key(i), (T, B, D)) for i in (1, 2))

    def one_device(params, carry, xs, targets):
        return jnp.sum(jax.vmap(_mse)(cell.parallel(params, carry, xs)[1], targets))

    def local(params, carry, xs, targets):
        ys = cell.parallel(params, carry, xs, axis_name="time")[1]
        return lax.psum(jnp.sum(jax.vmap(_mse)(ys, targets)), "time")

    split = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P("time"), P("time")), out_specs=P())
    placed = [jax.device_put(x, NamedSharding(mesh, P("time"))) for x in (xs, targets)]
    args = {"one device": (params, carry, xs, targets), f"split over {devices}": (params, carry, *placed)}
    compiled = {name: (jax.jit(jax.value_and_grad(fn)).lower(*args[name]).compile(), args[name])
                for name, fn in zip(args, (one_device, split))}
    temp = {name: c.memory_analysis().temp_size_in_bytes for name, (c, _) in compiled.items()}  # per device
    row = dict(T=T, B=B, D=D, H=H, devices=devices, temp_mb={k: v / 2**20 for k, v in temp.items()},
               memory_ratio_x_n=temp[f"split over {devices}"] / temp["one device"] * devices)
    # time only what fits: either call holds all of T at once in this process (the split one on its
    # devices together), one call at a time
    resident = [c.memory_analysis().argument_size_in_bytes + t for (c, _), t in zip(compiled.values(), temp.values())]
    need = max(resident[0], devices * resident[1])
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if need > available / 2:
        row.update(ms={name: float("nan") for name in compiled},
                   skipped=f"timing needs about {need / 2**30:.1f} GB, {available / 2**30:.1f} GB free")
    else:
        row["ms"] = _interleaved({}, (), budget_s, compiled=compiled)
        row["time_ratio"] = row["ms"][f"split over {devices}"] / row["ms"]["one device"]
    return row


def sharded_rows(configs, budget_s, timeout_s: int = 1800):
    """Table 4, each row in a process of its own with `devices` host devices."""
    rows = []
    for T, B, D, H, devices in configs:
        # the caller's XLA flags (optimisation level, say) apply to this process too
        flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
        argv = [sys.executable, "-m", "benchmarks._parallel_time", *map(str, (T, B, D, H, devices, budget_s))]
        result = subprocess.run(argv, env=dict(os.environ, XLA_FLAGS=flags), capture_output=True, text=True,
                                timeout=timeout_s)
        if result.returncode:
            raise RuntimeError(f"the time-split row T={T} failed:\n{result.stderr[-2000:]}")
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    return rows


def _print_header(title, methods, keys):
    print(f"\n== {title}")
    print(" ".join(f"{k:>6s}" for k in keys) + "".join(f" {m:>20s}" for m in methods) + "   (ms)", flush=True)


def _print_row(r, keys):
    line = " ".join(f"{r[k]!s:>6s}" for k in keys) + "".join(f" {ms:20.2f}" for ms in r["ms"].values())
    extra = [f"{k} {r[k]:.2f}x" for k in ("fwd_speedup", "grad_speedup", "speedup") if k in r]
    if "iterations" in r:
        extra.append("iterations " + ", ".join(f"{m} {n}" for m, n in r["iterations"].items()))
    if "temp_mb" in r:
        extra.append(f"time ratio {r['time_ratio']:.2f}" if "time_ratio" in r else r["skipped"])
        extra.append("temp MB per device " + ", ".join(f"{m} {mb:.1f}" for m, mb in r["temp_mb"].items())
                     + f" (x devices / one device: {r['memory_ratio_x_n']:.2f})")
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
    ("sharded", "sharded", sharded_rows, ("T", "B", "D", "H", "devices"), ("one device", "split over 8"),
     "LRU loss + grads (cell.parallel), time split over host devices (shard_map, axis_name=) against one "
     "device; host devices share this machine's cores"),
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


if __name__ == "__main__":
    T, B, D, H, devices = map(int, sys.argv[1:6])
    print(json.dumps(_split_training_step(T, B, D, H, devices, float(sys.argv[6]))))
