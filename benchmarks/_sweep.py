"""A hyperparameter sweep: 8 learning rates x 4 seeds trained in one vmapped, compiled call,
against the same 32 runs one after another (one compiled run, called 32 times)."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import optax

import jaxbptt as jb
from jaxbptt import tasks


SMOKE = dict(hidden=4, length=5, batch=2, iterations=2, rates=2, seeds=2)


def sweep_timing(cell="gru", hidden=32, length=50, batch=16, iterations=100, rates=8, seeds=4) -> dict:
    model = jb.with_readout({"gru": jb.gru, "lstm": jb.lstm, "elman": jb.elman}[cell](hidden), 1)
    opt = optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)
    train_step = jb.make_train_step(model.step, tasks.weighted_mse, opt, clip_norm=1.0)
    batches = lambda key: (model.initial_carry((batch,)), *tasks.adding(key, batch, length))
    loop = jb.train_loop(train_step, batches, iterations)

    def run(lr, params, seed):
        state = opt.init(params)
        state.hyperparams["learning_rate"] = lr
        return loop(params, state, jax.random.key(seed + 1))[2]

    lrs = jnp.logspace(-4, -1, rates)
    inits = [model.init(jax.random.key(s), 2) for s in range(seeds)]  # outside vmap (see jb.train_loop)
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *inits)
    seed_ids = jnp.arange(seeds)
    one = jax.jit(run)
    many = jax.jit(jax.vmap(jax.vmap(run, (None, 0, 0)), (0, None, None)))
    jax.block_until_ready(one(lrs[0], inits[0], seed_ids[0]))  # compile both first
    jax.block_until_ready(many(lrs, stacked, seed_ids))
    start = time.perf_counter()
    looped = [one(lr, inits[s], seed_ids[s]) for lr in lrs for s in range(seeds)]
    jax.block_until_ready(looped)
    loop_s = time.perf_counter() - start
    start = time.perf_counter()
    jax.block_until_ready(many(lrs, stacked, seed_ids))
    vmap_s = time.perf_counter() - start
    return {"cell": cell, "H": hidden, "T": length, "B": batch, "iterations": iterations, "runs": rates * seeds,
            "python_loop_s": loop_s, "vmapped_s": vmap_s, "ratio": vmap_s / loop_s}


def print_sweep(r: dict) -> None:
    print(f"\n== sweep: {r['runs']} training runs ({r['cell']}, H={r['H']}, adding T={r['T']}, B={r['B']}, "
          f"{r['iterations']} iterations each)")
    print(f"  Python loop over one compiled run: {r['python_loop_s']:.2f} s; one vmapped call: {r['vmapped_s']:.2f} s; "
          f"ratio {r['ratio']:.2f}")
