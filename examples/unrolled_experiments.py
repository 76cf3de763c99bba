"""`python -m examples.unrolled_experiments`: unrolled optimisation with jaxbptt -- hyperparameters,
simulators and chaotic systems -- by exact BPTT, truncation and evolution strategies.

1. Vicol, Metz, Sohl-Dickstein (ICML 2021), the learning-rate-schedule toy: SGD for T=100 steps on
   `f(x) = sqrt(x0^2 + 5) - sqrt(5) + sin(x1)^2 exp(-5 x0^2) + 0.25 |x1 - 100|` from x = (1, 1), the
   learning rate a linear schedule from exp(theta0) at step 0 to exp(theta1) at step T, the
   meta-objective the sum of `f` over the T steps. theta starts at (-4, -4); each method updates it
   with Adam (1e-2, b1 0.99) every K=10 inner steps, ES-type methods with 50 antithetic pairs
   (N=100) at sigma 0.3. Truncated methods see 10 steps at a time and settle on a schedule that is
   good for 10 steps (the short-horizon bias); PES, unbiased, moves towards the schedule that
   minimises the whole unroll's objective.
2. Li, Harrison, Sohl-Dickstein, Smith, Metz (NeurIPS 2023), Lorenz parameter learning: Euler
   steps (dt 0.005, T=2000) of the Lorenz system from (1.2, 1.3, 1.6), learning (log a, log r) from
   (3.116, 3.7) towards (log 10, log 28) by the squared error of z against the trajectory of the
   true system; windows of W=100 steps, 200 antithetic pairs at sigma 0.04, plain SGD. Workers are
   step-unlocked: 20 groups of 10 pairs, each at another window of its episode (a vmap of
   `online`'s update over the groups, their SGD steps averaged). Reported: the gradient variance
   of one window's estimate at the initial parameters, and the parameters' convergence.
3. Hypergradients of SGD on a small MLP (learning rate and weight decay, in log space) through
   T=100 (and 1,000) inner steps, the meta-objective the validation loss of the trained weights
   (`final_loss`): exact BPTT with `remat="sqrt"` against truncation (k=10) and PES, as
   meta-training curves; and the time of one exact hypergradient against `jax.grad` through
   `lax.scan`.
4. A gradient-quality table over the estimators (exact BPTT, TBPTT(k), RTRL, UORO, ES, PES, NRES):
   cosine with the exact gradient and variance over keys, on influence balancing and on the
   hypergradient problem.

All run in float32 on the default device (`--quick`: seconds, tiny sizes); `--figures DIR` writes
the pictures (PNG).
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.flatten_util import ravel_pytree

import jaxbptt as jb
from examples.online_experiments import balancing_problem, BALANCING_N

# ---- 1. the learning-rate-schedule toy ------------------------------------------------------------


def toy_loss(x):
    return (jnp.sqrt(x[0] ** 2 + 5) - jnp.sqrt(5.0) + jnp.sin(x[1]) ** 2 * jnp.exp(-5 * x[0] ** 2)
            + 0.25 * jnp.abs(x[1] - 100))


def schedule_problem(T: int = 100):
    """The toy as a jaxbptt step: params theta (2,), carry the inner iterate x (2,), input the step
    index t; y is f after the step, the per-step loss y itself (it reads no target). Returns
    (step, loss_fn, x0, ts, targets)."""
    toy_grad = jax.grad(toy_loss)

    def step(theta, x, t):
        lr = jnp.exp(theta[0]) * (T - t) / T + jnp.exp(theta[1]) * t / T
        x = x - lr * toy_grad(x)
        return x, toy_loss(x)

    ts = jnp.arange(T, dtype=jnp.float32)
    return step, (lambda y, target: y), jnp.ones(2, jnp.float32), ts, jnp.zeros_like(ts)


def schedule_objective(theta, T: int = 100):
    """The whole unroll's meta-objective: the sum of f over the T steps."""
    step, _, x0, ts, _ = schedule_problem(T)
    theta = jnp.asarray(theta, x0.dtype)
    return jnp.sum(lax.scan(lambda x, t: step(theta, x, t), x0, ts)[1])


# method, and whether it updates every K steps ("window") or once per episode of T steps
SCHEDULE_METHODS = {"TBPTT(10)": (jb.TBPTT(10, 10), "window"), "RTRL": (jb.RTRL(), "window"),
                    "UORO": (jb.UORO(), "window"), "ES (truncated)": (jb.ES(0.3, pairs=50), "window"),
                    "PES": (jb.PES(0.3, pairs=50), "window"), "NRES": (jb.NRES(0.3, pairs=50), "window"),
                    "ES (whole episode)": (jb.ES(0.3, pairs=50), "episode")}


def schedule_experiment(episodes: int = 2000, T: int = 100, K: int = 10, methods=tuple(SCHEDULE_METHODS),
                        seed: int = 0) -> list[dict]:
    """Each method meta-trains theta online (an Adam step every K inner steps; once per episode
    for ES over the whole episode), an episode of T steps after another (`reset` between them);
    the trajectory of theta, one point per episode."""
    step, loss_fn, x0, ts, targets = schedule_problem(T)
    outer = optax.adam(1e-2, b1=0.99, b2=0.999)
    rows = []
    for name in methods:
        method, every = SCHEDULE_METHODS[name]
        if isinstance(method, jb.TBPTT):
            method, every = jb.TBPTT(K, K), None
        else:
            every = K if every == "window" else T
        trainer = jb.online(step, loss_fn, outer, method, update_every=every)

        def episode(state, _):
            state, losses = trainer.update(state, ts, targets)
            return trainer.reset(state, x0), state.params

        start = time.perf_counter()
        state = trainer.init(jnp.array([-4.0, -4.0], jnp.float32), x0, ts, key=jax.random.key(seed))
        _, thetas = jax.jit(lambda s: lax.scan(episode, s, None, length=episodes))(state)
        thetas = np.asarray(thetas)
        rows.append({"method": name if not isinstance(method, jb.TBPTT) else f"TBPTT({K})", "thetas": thetas,
                     "theta": thetas[-1],
                     "objective": float(schedule_objective(jnp.asarray(thetas[-1]), T)),
                     "seconds": time.perf_counter() - start, "episodes": episodes, "T": T, "K": K})
    return rows


def schedule_grid(T: int = 100, n: int = 101, low: float = -6.0, high: float = 4.0):
    """The meta-objective on an n x n grid of (theta0, theta1) and its minimum."""
    axis = np.linspace(low, high, n, dtype=np.float32)
    values = jax.jit(jax.vmap(jax.vmap(lambda a, b: schedule_objective(jnp.stack([a, b]), T), (None, 0)), (0, None)))(
        jnp.asarray(axis), jnp.asarray(axis))
    values = np.asarray(values)
    values = np.where(np.isfinite(values), values, np.nanmax(np.where(np.isfinite(values), values, np.nan)))
    i, j = np.unravel_index(np.argmin(values), values.shape)
    return axis, values, (axis[i], axis[j]), float(values[i, j])


def print_schedule(rows, grid) -> None:
    axis, values, best, best_value = grid
    r0 = rows[0]
    print(f"\n== learning-rate schedule toy (Vicol et al. 2021): T={r0['T']}, K={r0['K']}, {r0['episodes']} episodes "
          f"({r0['episodes'] * r0['T'] // r0['K']} Adam steps); the whole unroll's objective at theta0 = (-4, -4): "
          f"{float(schedule_objective(jnp.array([-4.0, -4.0]), r0['T'])):.2f}, its minimum on the grid "
          f"{best_value:.2f} at ({best[0]:.2f}, {best[1]:.2f})")
    print(f"{'method':>18s} {'theta0':>7s} {'theta1':>7s} {'objective':>10s} {'seconds':>8s}")
    for r in rows:
        print(f"{r['method']:>18s} {r['theta'][0]:7.2f} {r['theta'][1]:7.2f} {r['objective']:10.2f} "
              f"{r['seconds']:8.1f}")


def plot_schedule(rows, grid, path: str) -> None:
    from jaxbptt._plot import _pyplot

    plt = _pyplot()
    axis, values, best, _ = grid
    fig, ax = plt.subplots(figsize=(6.0, 5.0))
    mesh = ax.contourf(axis, axis, np.log(values - values.min() + 1.0).T, levels=30, cmap="viridis")
    fig.colorbar(mesh, ax=ax, label="log(objective - min + 1)")
    for i, r in enumerate(rows):
        ax.plot(r["thetas"][:, 0], r["thetas"][:, 1], linestyle=("-", "--", ":", "-.")[i % 4], linewidth=2,
                label=f"{r['method']} ({r['objective']:.1f})")
    ax.plot(-4, -4, "ko")
    ax.plot(*best, "r*", markersize=14, label="grid minimum")
    ax.set(xlabel="theta0 (log lr at step 0)", ylabel="theta1 (log lr at step T)",
           title="meta-training a learning-rate schedule (T=100, K=10)")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- 2. Lorenz parameter learning -----------------------------------------------------------------

LORENZ_TRUE = (10.0, 28.0, 8.0 / 3.0)
LORENZ_START = jnp.array([1.2, 1.3, 1.6], jnp.float32)


def lorenz_step(dt: float = 0.005):
    """Euler steps of the Lorenz system with learnable (log a, log r); y is z."""

    def step(params, s, x):
        del x
        a, r, b = jnp.exp(params["log_a"]), jnp.exp(params["log_r"]), LORENZ_TRUE[2]
        s = s + dt * jnp.stack([a * (s[1] - s[0]), s[0] * (r - s[2]) - s[1], s[0] * s[1] - b * s[2]])
        return s, s[2]

    return step


def lorenz_targets(T: int, dt: float = 0.005):
    """z along the true system's trajectory from the same start."""
    truth = {"log_a": jnp.log(LORENZ_TRUE[0]), "log_r": jnp.log(LORENZ_TRUE[1])}
    return lax.scan(lambda s, _: lorenz_step(dt)(truth, s, None), LORENZ_START, None, length=T)[1]


def lorenz_loss(z, z_true):
    return (z - z_true) ** 2


# estimator, SGD learning rate (per step of the mean per-step loss), and the step after which it drops
# tenfold (Li et al.'s settings)
LORENZ_METHODS = {"NRES": (jb.NRES, 1e-5, None), "PES": (jb.PES, 1e-5, 1000), "ES (truncated)": (jb.ES, 3e-4, None)}


def lorenz_experiment(iterations: int = 5000, T: int = 2000, W: int = 100, groups: int = 20, pairs: int = 10,
                      sigma: float = 0.04, variance_keys: int = 64, methods=tuple(LORENZ_METHODS),
                      start=(3.116, 3.7), seed: int = 0) -> list[dict]:
    """Per method: SGD on (log a, log r) with `groups` step-unlocked worker groups of `pairs`
    antithetic pairs, each group a window of W steps per iteration, `groups` staggered windows
    apart; the learning rates of Li et al. (per step of the mean per-step loss, so divided by W
    here, where a window's loss is a sum). Also the variance over keys of one window's estimate at
    the start, averaged over the windows of an episode."""
    step = lorenz_step()
    targets = lorenz_targets(T)
    windows = T // W
    xs = jnp.zeros((T, 1), jnp.float32)
    params0 = {"log_a": jnp.float32(start[0]), "log_r": jnp.float32(start[1])}
    rows = []
    for name in methods:
        kind, lr, drop = LORENZ_METHODS[name]
        method = kind(sigma, pairs=pairs)
        schedule = optax.piecewise_constant_schedule(lr / W, {drop: 0.1} if drop else None)
        trainer = jb.online(step, lorenz_loss, optax.sgd(schedule), method, update_every=W)
        offsets = (jnp.arange(groups) * windows) // groups

        def iterate(carry, it):
            states, = carry
            position = (it + offsets) % windows  # each group's window in its episode

            def one(state, p):
                seg = jax.tree.map(lambda a: lax.dynamic_slice_in_dim(a, p * W, W), (xs, targets))
                state, losses = trainer.update(state, *seg)
                done = p == windows - 1
                fresh = trainer.reset(state, LORENZ_START)
                return jax.tree.map(lambda a, b: jnp.where(done, a, b), fresh, state), losses[0]

            states, losses = jax.vmap(one)(states, position)
            # every group started the window from the same params with plain SGD: the mean of their
            # updated params is the step with the mean of their estimates
            mean = jax.tree.map(lambda a: jnp.broadcast_to(a.mean(0), a.shape), states.params)
            return (states._replace(params=mean),), (jax.tree.map(lambda a: a[0], mean), losses.mean())

        keys = jax.random.split(jax.random.key(seed), groups)
        states = jax.vmap(lambda k: trainer.init(params0, LORENZ_START, key=k))(keys)
        # stagger: group g first runs the windows before its offset, parameters fixed
        still = jb.online(step, lorenz_loss, optax.sgd(0.0), method, update_every=W)

        def warm(state, p):
            return jax.lax.fori_loop(0, p, lambda i, s: still.update(s, *jax.tree.map(
                lambda a: lax.dynamic_slice_in_dim(a, i * W, W), (xs, targets)))[0], state)

        start_time = time.perf_counter()
        states = jax.jit(jax.vmap(warm))(states, offsets)
        (_,), (trajectory, window_losses) = jax.jit(lambda s: lax.scan(iterate, (s,), jnp.arange(iterations)))(states)
        trajectory = jax.tree.map(np.asarray, trajectory)
        seconds = time.perf_counter() - start_time
        final = {k: float(v[-1]) for k, v in trajectory.items()}
        variance = lorenz_variance(method, params0, variance_keys, T, W) if variance_keys else float("nan")
        rows.append({"method": name, "a": np.exp(trajectory["log_a"]), "r": np.exp(trajectory["log_r"]),
                     "final_a": float(np.exp(final["log_a"])), "final_r": float(np.exp(final["log_r"])),
                     "variance": variance, "seconds": seconds, "iterations": iterations, "T": T, "W": W,
                     "pairs": groups * pairs, "sigma": sigma, "lr": lr})
    return rows


def lorenz_variance(method, params, keys: int, T: int, W: int) -> float:
    """The variance over keys (trace of the covariance) of one window's estimate at fixed params,
    averaged over the episode's windows: `online` with a learning rate of zero, each window's
    estimate read off an optimizer that records its gradient."""
    step = lorenz_step()
    targets = lorenz_targets(T)
    record = optax.GradientTransformation(lambda p: p, lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), g))
    trainer = jb.online(step, lorenz_loss, record, method, update_every=W)
    xs = jnp.zeros((T, 1), jnp.float32)

    def estimates(key):
        state = trainer.init(params, LORENZ_START, key=key)

        def window(state, seg):
            state, _ = trainer.update(state, *seg)
            return state, ravel_pytree(state.opt_state)[0]

        segments = jax.tree.map(lambda a: a.reshape((T // W, W) + a.shape[1:]), (xs, targets))
        return lax.scan(window, state, segments)[1]

    g = jax.jit(jax.vmap(estimates))(jax.random.split(jax.random.key(7), keys))  # (keys, windows, 2)
    return float(jnp.mean(jnp.sum(jnp.var(g / W, axis=0), axis=-1)))


def print_lorenz(rows) -> None:
    r0 = rows[0]
    print(f"\n== Lorenz parameter learning (Li et al. 2023): T={r0['T']}, windows of {r0['W']}, {r0['pairs']} pairs at "
          f"sigma {r0['sigma']}, {r0['iterations']} SGD steps; true (a, r) = (10, 28), start (22.6, 40.4)")
    print(f"{'method':>15s} {'lr':>7s} {'final a':>8s} {'final r':>8s} {'variance of one window':>23s} {'seconds':>8s}")
    for r in rows:
        print(f"{r['method']:>15s} {r['lr']:7.0e} {r['final_a']:8.3f} {r['final_r']:8.3f} {r['variance']:23.4g} "
              f"{r['seconds']:8.1f}")


def plot_lorenz(rows, path: str) -> None:
    from jaxbptt._plot import _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.6))
    for i, r in enumerate(rows):
        style = ("-", "--", ":", "-.")[i % 4]
        axes[0].plot(r["a"], linestyle=style, label=r["method"])
        axes[1].plot(r["r"], linestyle=style, label=r["method"])
    for ax, name, truth in ((axes[0], "a", 10.0), (axes[1], "r", 28.0)):
        ax.axhline(truth, color="gray", linestyle="--", label="true")
        ax.set(xlabel="SGD step (one window per worker group)", ylabel=name, title=f"Lorenz: {name}")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- 3. hypergradients of SGD on an MLP -----------------------------------------------------------


def hyper_problem(T: int = 100, batch: int = 16, hidden: int = 16, seed: int = 0):
    """SGD with learning rate exp(theta[0]) and weight decay exp(theta[1]) on a one-hidden-layer MLP
    fitting y = sin(3 x) + noise from minibatches; the meta-objective is the validation loss of the
    weights after T steps. Returns (step, final_loss, theta0, weights0, batches)."""
    k = jax.random.split(jax.random.key(seed), 5)
    weights0 = {"W1": jax.random.normal(k[0], (1, hidden)), "b1": jnp.zeros(hidden),
                "W2": jax.random.normal(k[1], (hidden, 1)) / jnp.sqrt(hidden), "b2": jnp.zeros(1)}
    inputs = jax.random.uniform(k[2], (T, batch, 1), minval=-2, maxval=2)
    outputs = jnp.sin(3 * inputs) + 0.1 * jax.random.normal(k[3], inputs.shape)
    val_x = jnp.linspace(-2, 2, 200)[:, None]
    val_y = jnp.sin(3 * val_x)

    def predict(w, x):
        return jnp.tanh(x @ w["W1"] + w["b1"][None]) @ w["W2"] + w["b2"][None]

    def mse(w, x, y):
        return jnp.mean((predict(w, x) - y) ** 2)

    def step(theta, w, batch_xy):
        grads = jax.grad(mse)(w, *batch_xy)
        lr, wd = jnp.exp(theta[0]), jnp.exp(theta[1])
        return jax.tree.map(lambda p, g: p - lr * (g + wd * p), w, grads), None

    def final_loss(w):
        return mse(w, val_x, val_y)

    return step, final_loss, jnp.array([np.log(0.05), np.log(1e-3)], jnp.float32), weights0, (inputs, outputs)


def hyper_grad_fns(step, final_loss, weights0, batches, k: int = 10, pairs: int = 16, sigma: float = 0.05):
    """Hypergradient functions `theta, key -> (meta-loss, grad)`: exact BPTT with `remat="sqrt"`,
    truncated BPTT(k) (both `jb.value_and_grad` with the validation loss as `final_loss`), PES over
    windows of k and ES (`jb.online_grad`)."""

    def bptt(**options):
        f = jb.value_and_grad(step, None, final_loss=final_loss, **options)
        return lambda theta, key: (lambda out: (out[0][0], out[1]))(f(theta, weights0, batches))

    def estimator(method):
        f = jb.online_grad(step, None, method, final_loss=final_loss)
        return lambda theta, key: (lambda out: (out[0][0], out[1]))(f(theta, weights0, batches, key=key))

    return {"exact BPTT (remat sqrt)": bptt(remat="sqrt"), f"TBPTT({k})": bptt(truncation=k),
            f"PES (window {k})": estimator(jb.PES(sigma, pairs=pairs, window=k)), "ES": estimator(jb.ES(sigma, pairs))}


def hyper_experiment(meta_steps: int = 300, T: int = 100, k: int = 10, pairs: int = 16, sigma: float = 0.05,
                     meta_lr: float = 0.03, methods=None, seed: int = 0) -> list[dict]:
    """Meta-training theta = (log lr, log wd) with Adam, one hypergradient (a whole inner run of T
    steps) per meta-step; per method the validation loss after T steps along the way."""
    step, final_loss, theta0, weights0, batches = hyper_problem(T, seed=seed)
    fns = hyper_grad_fns(step, final_loss, weights0, batches, k, pairs, sigma)
    fns = {name: fn for name, fn in fns.items() if methods is None or name in methods}
    opt = optax.adam(meta_lr)
    rows = []
    for name, fn in fns.items():
        def meta_step(state, key):
            theta, opt_state = state
            loss, grad = fn(theta, key)
            updates, opt_state = opt.update(grad, opt_state, theta)
            return (optax.apply_updates(theta, updates), opt_state), (loss, theta)

        start = time.perf_counter()
        (theta, _), (losses, thetas) = jax.jit(lambda s, keys: lax.scan(meta_step, s, keys))(
            (theta0, opt.init(theta0)), jax.random.split(jax.random.key(seed + 1), meta_steps))
        rows.append({"method": name, "losses": np.asarray(losses), "thetas": np.asarray(thetas),
                     "theta": np.asarray(theta), "final": float(losses[-1]), "seconds": time.perf_counter() - start,
                     "T": T, "k": k, "meta_steps": meta_steps})
    return rows


def hyper_timing(T: int = 1000, repeats: int = 5) -> list[dict]:
    """One exact hypergradient through T inner steps: `jax.grad` through `lax.scan` against
    `jb.value_and_grad(step, None, final_loss=...)` (the default call, and `remat="sqrt"`), median
    of interleaved calls, with XLA's temp memory."""
    step, final_loss, theta0, weights0, batches = hyper_problem(T)

    def scan_meta(theta):
        return jax.value_and_grad(lambda th: final_loss(lax.scan(lambda w, b: step(th, w, b), weights0, batches)[0]))(
            theta)

    def jaxbptt(**options):
        f = jb.value_and_grad(step, None, final_loss=final_loss, **options)
        return lambda theta: (lambda out: (out[0][0], out[1]))(f(theta, weights0, batches))

    fns = {"jax.grad(lax.scan)": scan_meta, "jaxbptt": jaxbptt(), "jaxbptt remat sqrt": jaxbptt(remat="sqrt")}
    compiled = {name: jax.jit(f).lower(theta0).compile() for name, f in fns.items()}
    for c in compiled.values():
        jax.block_until_ready(c(theta0))
    times = {name: [] for name in compiled}
    for r in range(repeats):
        for name in list(compiled)[r % 3:] + list(compiled)[:r % 3]:
            start = time.perf_counter()
            jax.block_until_ready(compiled[name](theta0))
            times[name].append(time.perf_counter() - start)
    grads = {name: np.asarray(c(theta0)[1]) for name, c in compiled.items()}
    rows = []
    for name, c in compiled.items():
        memory = c.memory_analysis()
        rows.append({"method": name, "T": T, "ms": 1e3 * float(np.median(times[name])),
                     "temp_mb": memory.temp_size_in_bytes / 1e6 if memory is not None else float("nan"),
                     "grad_error": float(np.max(np.abs(grads[name] - grads["jax.grad(lax.scan)"])
                                                / np.max(np.abs(grads["jax.grad(lax.scan)"]))))})
    return rows


def print_hyper(runs, timing) -> None:
    for rows in runs:
        r0 = rows[0]
        print(f"\n== hypergradients of SGD (log lr, log wd) on a 1-16-1 tanh MLP, T={r0['T']} inner steps, "
              f"meta-objective the validation MSE of the final weights; {r0['meta_steps']} Adam meta-steps from log lr = log 0.05, "
              "log wd = log 1e-3")
        print(f"{'method':>24s} {'final val MSE':>14s} {'log lr':>7s} {'log wd':>7s} {'seconds':>8s}")
        for r in rows:
            print(f"{r['method']:>24s} {r['final']:14.4g} {r['theta'][0]:7.2f} {r['theta'][1]:7.2f} "
                  f"{r['seconds']:8.1f}")
    print(f"\n-- one exact hypergradient through T={timing[0]['T']} steps (median of interleaved calls)")
    print(f"{'method':>20s} {'ms':>8s} {'x jax.grad':>10s} {'temp MB':>8s} {'max rel. grad diff':>19s}")
    base = timing[0]
    for r in timing:
        print(f"{r['method']:>20s} {r['ms']:8.2f} {r['ms'] / base['ms']:10.2f} {r['temp_mb']:8.2f} "
              f"{r['grad_error']:19.2e}")


def plot_hyper(runs, path: str) -> None:
    from jaxbptt._plot import _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(1, len(runs), figsize=(6.0 * len(runs), 4.0), squeeze=False)
    for ax, rows in zip(axes[0], runs):
        for i, r in enumerate(rows):
            ax.plot(r["losses"], linestyle=("-", "--", ":", "-.")[i % 4], linewidth=2,
                    label=f"{r['method']} ({r['final']:.3g})")
        ax.set(yscale="log", xlabel="meta-step (one inner run of SGD each)", ylabel="validation MSE after the run",
               title=f"meta-training SGD's learning rate and weight decay, T={rows[0]['T']}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- 4. the estimators side by side ---------------------------------------------------------------


def _exact_gradient(step, loss_fn, final_loss, params, carry, xs, targets):
    """Exact BPTT: `jb.value_and_grad` with the per-step and final losses."""
    return jax.jit(jb.value_and_grad(step, loss_fn, final_loss=final_loss))(params, carry, xs, targets)[1]


def estimator_table(keys: int = 200, balancing_T: int = 100, hyper_T: int = 100, k: int = 10, pairs: int = 16,
                    sigma_balancing: float = 0.01, sigma_hyper: float = 0.05, methods=None,
                    problems=("influence balancing", "hypergradient")) -> list[dict]:
    """Each estimator's gradient at fixed parameters, over `keys` keys, against exact BPTT's
    (`jb.value_and_grad`, with the final loss), on influence balancing (theta = 0.5 from its fixed point, the
    per-step losses of `balancing_T` steps) and on the hypergradient problem (the validation loss
    after `hyper_T` SGD steps): the mean cosine of one estimate, the cosine of the mean, the
    relative error of the mean and the variance relative to the exact gradient's squared norm."""
    def balancing():
        step, loss_fn, _ = balancing_problem()
        params = {"theta": jnp.array(0.5, jnp.float32)}
        carry = lax.fori_loop(0, 200, lambda i, s: step(params, s, None)[0], jnp.zeros(BALANCING_N, jnp.float32))
        return (step, loss_fn, None, params, carry, jnp.zeros((balancing_T, 1), jnp.float32),
                jnp.ones((balancing_T,), jnp.float32), sigma_balancing)

    def hypergradient():
        h_step, h_final, theta0, weights0, batches = hyper_problem(hyper_T)
        return h_step, None, h_final, theta0, weights0, batches, None, sigma_hyper

    cases = {"influence balancing": balancing, "hypergradient": hypergradient}
    rows = []
    for problem in problems:
        step_fn, loss, final, p, c, x, t, sigma = cases[problem]()
        exact = ravel_pytree(_exact_gradient(step_fn, loss, final, p, c, x, t))[0]
        rows.append({"problem": problem, "method": "exact BPTT", "cosine_one": 1.0, "cosine_mean": 1.0,
                     "error_mean": 0.0, "relative_variance": 0.0, "keys": keys})
        named = {f"TBPTT({k})": jb.TBPTT(k, k), "RTRL": jb.RTRL(), "UORO": jb.UORO(), "ES": jb.ES(sigma, pairs),
                 f"PES (window {k})": jb.PES(sigma, pairs, window=k),
                 f"NRES (window {k})": jb.NRES(sigma, pairs, window=k)}
        for name, method in named.items():
            if methods is not None and name not in methods:
                continue
            f = jb.online_grad(step_fn, loss, method, final_loss=final)
            draws = jax.jit(jax.vmap(lambda key: ravel_pytree(f(p, c, x, t, key=key)[1])[0]))(
                jax.random.split(jax.random.key(3), keys))
            norms = jnp.linalg.norm(draws, axis=1) * jnp.linalg.norm(exact)
            mean = draws.mean(0)
            rows.append({"problem": problem, "method": name,
                         "cosine_one": float(jnp.mean(draws @ exact / jnp.maximum(norms, 1e-30))),
                         "cosine_mean": float(mean @ exact / (jnp.linalg.norm(mean) * jnp.linalg.norm(exact))),
                         "error_mean": float(jnp.linalg.norm(mean - exact) / jnp.linalg.norm(exact)),
                         "relative_variance": float(jnp.sum(jnp.var(draws, axis=0)) / jnp.sum(exact**2)),
                         "keys": keys})
    return rows


def print_estimators(rows) -> None:
    print(f"\n== gradient estimators against exact BPTT at fixed parameters ({rows[0]['keys']} keys each)")
    print(f"{'problem':>20s} {'method':>16s} {'cos, one key':>13s} {'cos, mean':>10s} {'|mean - g|/|g|':>15s} "
          f"{'var / |g|^2':>12s}")
    for r in rows:
        print(f"{r['problem']:>20s} {r['method']:>16s} {r['cosine_one']:13.4f} {r['cosine_mean']:10.4f} "
              f"{r['error_mean']:15.4g} {r['relative_variance']:12.4g}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m examples.unrolled_experiments", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of seconds")
    parser.add_argument("--figures", default=".", help="the folder for the pictures (PNG)")
    parser.add_argument("--only", default="schedule,lorenz,hyper,estimators",
                        help="comma-separated parts to run: schedule, lorenz, hyper, estimators")
    args = parser.parse_args(argv)
    parts, out = args.only.split(","), {}
    figure = lambda name: os.path.join(args.figures, name)
    if "schedule" in parts:
        out["schedule"] = schedule_experiment(episodes=3, T=20, K=5) if args.quick else schedule_experiment()
        grid = schedule_grid(T=20, n=5) if args.quick else schedule_grid()
        print_schedule(out["schedule"], grid)
        plot_schedule(out["schedule"], grid, figure("pes_schedule.png"))
    if "lorenz" in parts:
        out["lorenz"] = (lorenz_experiment(iterations=4, T=40, W=10, groups=2, pairs=2, variance_keys=4)
                         if args.quick else lorenz_experiment())
        print_lorenz(out["lorenz"])
        plot_lorenz(out["lorenz"], figure("nres_lorenz.png"))
    if "hyper" in parts:
        out["hyper"] = ([hyper_experiment(meta_steps=3, T=12, k=4, pairs=2)] if args.quick
                        else [hyper_experiment(T=100), hyper_experiment(T=1000)])
        out["hyper_timing"] = hyper_timing(T=20, repeats=1) if args.quick else hyper_timing()
        print_hyper(out["hyper"], out["hyper_timing"])
        plot_hyper(out["hyper"], figure("hypergradients.png"))
    if "estimators" in parts:
        out["estimators"] = (estimator_table(keys=3, balancing_T=10, hyper_T=8, k=4, pairs=2) if args.quick
                             else estimator_table())
        print_estimators(out["estimators"])
    return out


if __name__ == "__main__":
    main()
