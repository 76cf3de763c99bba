"""A sweep split over host devices: the same 16 training runs (4 learning rates x 4 seeds) as one
vmapped call on one device and as `jaxbptt.sharded_sweep` over 1, 2 and 4 host devices.

The device count is fixed when JAX starts, so each count runs in its own process
(`python -m benchmarks._sharded_sweep DEVICES` prints one JSON line); both calls of a count are
timed side by side, interleaved, in that process.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

RUNS, ITERATIONS, T, B, H = 16, 20, 20, 8, 16  # tiny on purpose: the suite also runs as a smoke test


def _measure(repeats: int = 5) -> dict:
    import jax
    import jax.numpy as jnp
    import optax

    import jaxbptt as jb

    model = jb.with_readout(jb.gru(H), 1)
    opt = optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)
    train_step = jb.make_train_step(model.step, jb.tasks.weighted_mse, opt, clip_norm=1.0)
    batches = lambda key: (model.initial_carry((B,)), *jb.tasks.adding(key, B, T))
    loop = jb.train_loop(train_step, batches, ITERATIONS)

    def run(lr, params, seed):
        state = opt.init(params)
        state.hyperparams["learning_rate"] = lr
        return loop(params, state, jax.random.key(seed))[2]

    seeds = RUNS // 4
    inits = [model.init(jax.random.key(s), 2) for s in range(seeds)]  # outside vmap (see jb.train_loop)
    lrs = jnp.repeat(jnp.logspace(-4, -1, 4), seeds)
    seed_ids = jnp.tile(jnp.arange(seeds), 4)
    params = jax.tree.map(lambda *a: jnp.stack(a)[seed_ids], *inits)
    calls = {"one device, vmap": jax.jit(jax.vmap(run)), "sharded_sweep": jb.sharded_sweep(run)}
    times = {name: [] for name in calls}
    for name, f in calls.items():  # compile first
        jax.block_until_ready(f(lrs, params, seed_ids))
    for _ in range(repeats):
        for name, f in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(f(lrs, params, seed_ids))
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    return {"devices": jax.device_count(), **{f"{k} s": v for k, v in medians.items()},
            "ratio": medians["sharded_sweep"] / medians["one device, vmap"]}


def sharded_sweep_timing(devices=(1, 2, 4), timeout_s: int = 600) -> list[dict]:
    rows = []
    for n in devices:
        # the caller's XLA flags (optimisation level, say) apply to this count's process too
        flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n}".strip()
        env = dict(os.environ, XLA_FLAGS=flags)
        result = subprocess.run([sys.executable, "-m", "benchmarks._sharded_sweep", str(n)], env=env,
                                capture_output=True, text=True, timeout=timeout_s)
        if result.returncode:
            raise RuntimeError(f"the {n}-device sweep failed:\n{result.stderr[-2000:]}")
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    return rows


def print_sharded_sweep(rows: list[dict]) -> None:
    print(f"\n== sharded sweep: {RUNS} training runs (GRU H={H}, adding T={T}, B={B}, {ITERATIONS} iterations each), "
          f"split over host devices; ratio = sharded / one vmapped call on one device, same process")
    for r in rows:
        print(f"  {r['devices']} device(s): one device {r['one device, vmap s']:.3f} s, "
              f"sharded {r['sharded_sweep s']:.3f} s, ratio {r['ratio']:.2f}")


if __name__ == "__main__":
    print(json.dumps(_measure()))
