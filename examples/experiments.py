"""`python -m examples.experiments`: the classic results, reproduced on a CPU in minutes.

Each experiment trains every model for all its seeds in one compiled call (`jax.vmap` over seeds,
and over truncation lengths, of `jaxbptt.train_loop`), then evaluates on held-out data:

1. The adding problem at T = 150 (Le, Jaitly & Hinton 2015, figure 2): the IRNN and the LSTM drive
   the test MSE far below the 0.167 of always predicting the mean; a tanh RNN with its default
   initialisation stays at it.
2. Sequential digits: scikit-learn's 8x8 digits read pixel by pixel; test accuracy per cell.
3. Exact against truncated BPTT (k = 5, 20) on the adding problem, and on the copy (memory) task
   (k = 5, 10 against a delay of 20 steps): a truncation window shorter than the dependency cannot
   learn to carry the information across it, only to use what the dynamics happen to carry.

Prints a results table (seeds, iterations, the test metric's mean and range, wall time) and writes
the learning curves as a PNG.
"""

from __future__ import annotations

import argparse
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxbptt as jb
from jaxbptt import tasks


class Result(NamedTuple):
    experiment: str
    model: str
    seeds: int
    iterations: int
    metric: str
    values: np.ndarray  # one per seed
    baseline: str
    seconds: float
    curves: np.ndarray  # (seeds, iterations) training losses


def init_seeds(model, seeds: int, input_size: int):
    """Params for each seed, stacked on a leading axis. Initialised one seed at a time, outside
    `vmap`: a vmapped orthogonal initialisation is a batched QR, which can deadlock JAX's CPU
    backend on two cores (seen with JAX 0.10)."""
    inits = [model.init(jax.random.key(seed), input_size) for seed in range(seeds)]
    return jax.tree.map(lambda *a: jnp.stack(a), *inits)


def _cells(hidden: int) -> dict:
    return {
        "tanh RNN": jb.elman(hidden),
        "IRNN": jb.elman(hidden, activation="relu", recurrent_init="identity"),
        "LSTM": jb.lstm(hidden),
        "GRU": jb.gru(hidden),
    }


def _optimizer(learning_rate: float):
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(learning_rate))


def _adding_runs(cell, length, iterations, seeds, batch, learning_rate, truncations=(None,)):
    """Train on fresh adding batches; test MSE on 1,000 held-out sequences, per (truncation, seed)."""
    model = jb.with_readout(cell, 1)
    optimizer = _optimizer(learning_rate)
    test_xs, test_targets = tasks.adding(jax.random.key(10_000), 1000, length)

    def run(truncation, params, seed):
        options = {} if truncation is None else {"truncation": truncation}
        train_step = jb.make_train_step(model.step, tasks.weighted_mse, optimizer, **options)
        batches = lambda key: (model.initial_carry((batch,)), *tasks.adding(key, batch, length))
        params, _, losses = jb.train_loop(train_step, batches, iterations)(params, optimizer.init(params),
                                                                        jax.random.key(seed + 1))
        _, ys = jb.unroll(model.step, params, model.initial_carry((1000,)), test_xs)
        return jnp.mean((ys[-1, :, 0] - test_targets.value[-1, :, 0]) ** 2), losses

    params, seed_ids = init_seeds(model, seeds, 2), jnp.arange(seeds)
    if truncations == (None,):
        return jax.jit(jax.vmap(lambda p, s: run(None, p, s)))(params, seed_ids)
    ks = jnp.asarray(truncations)
    return jax.jit(jax.vmap(jax.vmap(run, (None, 0, 0)), (0, None, None)))(ks, params, seed_ids)


def _copy_runs(cell, delay, length, symbols, iterations, seeds, batch, learning_rate, truncations):
    """Copy task: test accuracy of the recalled symbols on 500 held-out sequences, per (k, seed)."""
    model = jb.with_readout(cell, symbols)
    optimizer = _optimizer(learning_rate)
    test_xs, test_targets = tasks.copy_memory(jax.random.key(10_000), 500, delay, length, symbols)

    def run(truncation, params, seed):
        train_step = jb.make_train_step(model.step, tasks.weighted_cross_entropy, optimizer, truncation=truncation)
        batches = lambda key: (model.initial_carry((batch,)), *tasks.copy_memory(key, batch, delay, length, symbols))
        params, _, losses = jb.train_loop(train_step, batches, iterations)(params, optimizer.init(params),
                                                                        jax.random.key(seed + 1))
        _, ys = jb.unroll(model.step, params, model.initial_carry((500,)), test_xs)
        hits = (jnp.argmax(ys, axis=-1) == test_targets.value) * test_targets.weight
        return jnp.sum(hits) / jnp.sum(test_targets.weight), losses

    params = init_seeds(model, seeds, symbols + 2)
    ks = jnp.asarray(truncations)
    return jax.jit(jax.vmap(jax.vmap(run, (None, 0, 0)), (0, None, None)))(ks, params, jnp.arange(seeds))


def _digits_runs(cell, iterations, seeds, batch, learning_rate):
    model = jb.with_readout(cell, 10)
    optimizer = _optimizer(learning_rate)
    train_xs, train_targets = tasks.digits("train")
    test_xs, test_targets = tasks.digits("test")
    train_step = jb.make_train_step(model.step, tasks.weighted_cross_entropy, optimizer)

    def run(params, seed):
        batches = lambda key: (model.initial_carry((batch,)), *tasks.batches(key, train_xs, train_targets, batch))
        params, _, losses = jb.train_loop(train_step, batches, iterations)(params, optimizer.init(params),
                                                                        jax.random.key(seed + 1))
        _, ys = jb.unroll(model.step, params, model.initial_carry((test_xs.shape[1],)), test_xs)
        return tasks.accuracy(ys[-1], test_targets.value[-1]), losses

    return jax.jit(jax.vmap(run))(init_seeds(model, seeds, 1), jnp.arange(seeds))


def _timed(fn, *args):
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - start


def run_all(quick: bool = False, seeds: int = 2, progress=None, *, smoke: bool = False) -> list[Result]:
    """All three experiments; `quick` shrinks them to a smoke run (results then mean nothing), and
    `smoke` also keeps only the first model of each experiment (each kind of run compiles once)."""
    quick = quick or smoke
    scale = 50 if quick else 1
    length = 20 if quick else 150
    hidden = 16 if quick else 64
    cells = _cells(hidden)
    plan = [
        ("adding", name, cells[name], it // scale) for name, it in (("tanh RNN", 6000), ("IRNN", 6000), ("LSTM", 2000))
    ] + [("truncation", "LSTM", cells["LSTM"], 2000 // scale), ("copy", "LSTM", cells["LSTM"], 1500 // scale)] + [
        ("digits", name, cells[name], 1500 // scale) for name in ("tanh RNN", "IRNN", "LSTM", "GRU")
    ]
    if smoke:
        plan = [entry for i, entry in enumerate(plan) if entry[0] not in {e[0] for e in plan[:i]}]
    results = []
    for experiment, name, cell, iterations in (progress(plan) if progress else plan):
        if experiment == "adding":
            (mse, curves), seconds = _timed(_adding_runs, cell, length, iterations, seeds, 32, 1e-3)
            results.append(Result(f"adding, T={length}", name, seeds, iterations, "test MSE", np.asarray(mse),
                                  f"{tasks.ADDING_BASELINE_MSE:.3f}", seconds, np.asarray(curves)))
        elif experiment == "truncation":
            ks = (5, 20) if not quick else (2, 5)
            (mse, curves), seconds = _timed(_adding_runs, cell, length, iterations, seeds, 32, 1e-3, ks)
            for i, k in enumerate(ks):
                results.append(Result(f"adding, T={length}", f"{name}, truncation={k}", seeds, iterations,
                                      "test MSE", np.asarray(mse[i]), f"{tasks.ADDING_BASELINE_MSE:.3f}",
                                      seconds / len(ks), np.asarray(curves[i])))
        elif experiment == "copy":
            delay, length_, symbols = (20, 5, 8) if not quick else (4, 2, 4)
            ks = (2 * length_ + delay, 10, 5) if not quick else (2 * length_ + delay, 2)
            (acc, curves), seconds = _timed(_copy_runs, cell, delay, length_, symbols, iterations, seeds, 32, 3e-3, ks)
            for i, k in enumerate(ks):
                label = f"{name}, exact" if i == 0 else f"{name}, truncation={k}"
                results.append(Result(f"copy, delay={delay}", label, seeds, iterations, "test accuracy",
                                      np.asarray(acc[i]), f"{1 / symbols:.3f}", seconds / len(ks), np.asarray(curves[i])))
        else:
            # the IRNN's tiny input weights (standard deviation 1e-3) need a larger step size to grow
            rate = 3e-2 if name == "IRNN" else 3e-3
            (acc, curves), seconds = _timed(_digits_runs, cell, iterations, seeds, 64, rate)
            results.append(Result("sequential digits (64 steps)", f"{name} (lr {rate:g})", seeds, iterations,
                                  "test accuracy", np.asarray(acc), "0.100", seconds, np.asarray(curves)))
    return results


def print_table(results: list[Result]) -> None:
    print(f"{'experiment':30s} {'model':24s} {'seeds':>5s} {'iters':>6s} {'metric':14s} {'mean':>7s} "
          f"{'min':>7s} {'max':>7s} {'baseline':>8s} {'time s':>7s}")
    for r in results:
        print(f"{r.experiment:30s} {r.model:24s} {r.seeds:5d} {r.iterations:6d} {r.metric:14s} "
              f"{r.values.mean():7.4f} {r.values.min():7.4f} {r.values.max():7.4f} {r.baseline:>8s} {r.seconds:7.1f}")


def plot_curves(results: list[Result], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [("adding", lambda r: r.experiment.startswith("adding") and "truncation" not in r.model),
              ("truncation", lambda r: "LSTM" in r.model and r.experiment.startswith("adding")),
              ("copy", lambda r: r.experiment.startswith("copy")),
              ("digits", lambda r: r.experiment.startswith("sequential"))]
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
    for ax, (title, keep) in zip(axes, groups):
        for r in filter(keep, results):
            curve = r.curves.mean(axis=0)
            window = max(1, len(curve) // 50)
            smooth = np.convolve(curve, np.ones(window) / window, mode="valid")
            label = r.model if title not in ("truncation", "copy") else (
                r.model.replace("LSTM, ", "") if "trunc" in r.model else "exact BPTT")
            ax.plot(np.arange(len(smooth)) + window, smooth, label=label)
        if title in ("adding", "truncation"):
            ax.axhline(tasks.ADDING_BASELINE_MSE, color="gray", linestyle="--", linewidth=1, label="predict the mean")
        ax.set_yscale("log")
        ax.set_xlabel("iteration")
        ax.set_ylabel("training loss (mean over seeds)")
        ax.set_title({"adding": "adding problem, T=150", "truncation": "LSTM on adding: exact vs truncated",
                      "copy": "LSTM on copy (delay 20): exact vs truncated",
                      "digits": "sequential digits (cross-entropy)"}[title])
        ax.legend(fontsize="small")
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> list[Result]:
    parser = argparse.ArgumentParser(prog="python -m examples.experiments", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="learning_curves.png", help="where to write the learning curves (PNG)")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a tiny smoke run (its numbers mean nothing)")
    parser.add_argument("--smoke", action="store_true",
                        help="--quick with one model per experiment: checks that each kind of run works")
    parser.add_argument("--modern", action="store_true",
                        help="instead: minGRU and LRU against the LSTM on the adding problem (table only)")
    args = parser.parse_args(argv)
    try:
        from tqdm import tqdm

        progress = lambda items: tqdm(items, desc="experiments", unit="run")
    except ImportError:
        progress = None
    start = time.perf_counter()
    if args.modern:
        from .parallel_experiments import run_modern

        results = run_modern(args.quick or args.smoke, args.seeds, progress)
    else:
        results = run_all(args.quick, args.seeds, progress, smoke=args.smoke)
    print(f"\n{jax.devices()[0].platform}: {len(results)} results in {time.perf_counter() - start:.0f} s "
          f"(each row: all its seeds trained in one compiled call)")
    print_table(results)
    if not args.modern:
        plot_curves(results, args.out)
        print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
