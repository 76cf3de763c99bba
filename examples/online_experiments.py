"""`python -m examples.online_experiments`: online gradients against BPTT, two published results.

1. Tallec & Ollivier 2017 ("Unbiased Online Recurrent Optimization", section 6, influence
   balancing): a linear system `s_{t+1} = A s_t + theta * v` with `A` upper bidiagonal (1/2 on the
   diagonal and the superdiagonal), `v` = (+1 x 10, -1 x 13) and the loss `(s_{t+1}[0] - 1)^2 / 2`.
   A rise of `theta` raises `s[0]` within a few steps but lowers it in the long run
   (`s*[0] = -6 theta` at the fixed point): truncated BPTT with a short truncation sees only the
   short-term influence and drives theta the wrong way, while RTRL and UORO find theta = -1/6; so
   do the unbiased evolution strategies PES and NRES (Vicol et al. 2021), where truncated ES, like
   truncated BPTT, does not.
2. A gradient-quality table in the manner of Menick et al. 2021 and Marschall et al. 2020: for
   small Elman and GRU models, the cosine similarity of each method's gradient with exact BPTT's,
   the time per step and the XLA temp memory of the compiled gradient.
3. A short training run per method on the adding problem (`jaxbptt.tasks.adding`): each batch's
   gradient from the method (parameters fixed over the sequence), one Adam step per batch, the same
   batches for every method; the loss curves go to a figure (`--figure`, PNG).

All run in float32 on the default device within a few minutes on 2 CPU cores (`--quick`: seconds).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import jaxbptt as jb

BALANCING_N, BALANCING_POSITIVE = 23, 10


def balancing_problem(n: int = BALANCING_N, positive: int = BALANCING_POSITIVE):
    """The influence-balancing system as a jaxbptt step; returns (step, loss_fn, theta*)."""
    A = 0.5 * (jnp.eye(n, dtype=jnp.float32) + jnp.eye(n, k=1, dtype=jnp.float32))
    v = jnp.where(jnp.arange(n) < positive, 1.0, -1.0).astype(jnp.float32)

    def step(params, s, x):
        del x  # the system has no input
        s = s @ A.T + params["theta"] * v
        return s, s[..., 0]

    def loss_fn(y, target):
        return 0.5 * jnp.mean((y - target) ** 2)

    # fixed point: s_i = 2 theta v_i + s_{i+1}, so s*[0] = 2 theta sum(v); the target 1 needs this theta
    return step, loss_fn, 1.0 / (2.0 * float(jnp.sum(v)))


BALANCING_METHODS = {"TBPTT(1)": jb.TBPTT(1, 1), "TBPTT(5)": jb.TBPTT(5, 5), "TBPTT(20)": jb.TBPTT(20, 20),
                     "RTRL": jb.RTRL(), "UORO": jb.UORO(), "ES (truncated)": jb.ES(0.1, pairs=100),
                     "PES": jb.PES(0.1, pairs=100), "NRES": jb.NRES(0.1, pairs=100)}


def influence_balancing(steps: int = 30_000, learning_rate: float = 1e-5, seeds: int = 4,
                        methods=tuple(BALANCING_METHODS)) -> list[dict]:
    """Online SGD on theta along one stream (an update every step; every k steps for TBPTT(k))
    from theta = 0.5, with each method: the final theta over `seeds` keys (the randomness of UORO
    and of the evolution strategies, 100 antithetic pairs at sigma 0.1, one step per window; the
    others are deterministic) and its largest distance to theta* = -1/6."""
    step, loss_fn, theta_star = balancing_problem()
    params, carry = {"theta": jnp.array(0.5, jnp.float32)}, jnp.ones((BALANCING_N,), jnp.float32)
    rows = []
    for name in methods:
        method = BALANCING_METHODS[name]
        every = method.k1 if isinstance(method, jb.TBPTT) else 1
        length = steps // every * every
        xs, targets = jnp.zeros((length, 1), jnp.float32), jnp.ones((length,), jnp.float32)
        trainer = jb.online(step, loss_fn, optax.sgd(learning_rate), method)

        def run(key):
            state, losses = trainer.update(trainer.init(params, carry, xs, key=key), xs, targets)
            return state.params["theta"], losses[-1] / every

        thetas, last = jax.jit(jax.vmap(run))(jax.random.split(jax.random.key(0), seeds))
        rows.append({"method": name, "theta": float(jnp.mean(thetas)),
                     "error": float(jnp.max(jnp.abs(thetas - theta_star))),
                     "last_loss": float(jnp.max(last)), "theta_star": theta_star, "steps": steps,
                     "learning_rate": learning_rate, "seeds": seeds})
    return rows


def _problem(cell: str, T: int, B: int, D: int, H: int, seed: int = 0):
    model = jb.with_readout({"elman": jb.elman, "gru": jb.gru}[cell](H), 1)
    k = jax.random.split(jax.random.key(seed), 3)
    params = model.init(k[0], D)
    xs = jax.random.normal(k[1], (T, B, D), jnp.float32)
    targets = jnp.cumsum(xs[..., :1], axis=0) / jnp.sqrt(jnp.arange(1, T + 1.0))[:, None, None]  # a memory task
    return model.step, params, model.initial_carry((B,)), xs, targets


def _mse(y, t):
    return jnp.mean((y - t) ** 2)


def _time_ms(f, *args, repeats: int = 3) -> float:
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


QUALITY_METHODS = {"exact BPTT": None, "RTRL": jb.RTRL(), "SnAp-1": jb.SnAp(1), "SnAp-2": jb.SnAp(2),
                   "UORO": jb.UORO(), "UORO x100": jb.UORO(), "TBPTT(5)": jb.TBPTT(5, 5)}


def gradient_quality(cells=("elman", "gru"), T: int = 50, B: int = 4, D: int = 4, H: int = 16,
                     methods=tuple(QUALITY_METHODS)) -> list[dict]:
    """Each method's gradient on the same sequence: cosine with exact BPTT (one UORO key), ms per
    step (median of 3 calls), XLA temp MB of the compiled gradient."""
    methods = {name: QUALITY_METHODS[name] for name in methods}
    rows = []
    for cell in cells:
        step, params, carry, xs, targets = _problem(cell, T, B, D, H)
        exact_fn = jb.value_and_grad(step, _mse)
        exact = jax.flatten_util.ravel_pytree(exact_fn(params, carry, xs, targets)[1])[0]
        for name, method in methods.items():
            if method is None:
                f = jax.jit(lambda p, c, x, t, k: exact_fn(p, c, x, t))
            elif name == "UORO x100":  # the mean of 100 keys' estimates: UORO is unbiased
                one = jb.online_grad(step, _mse, method)
                f = jax.jit(lambda p, c, x, t, k: jax.tree.map(lambda a: a.mean(0), jax.vmap(
                    lambda kk: one(p, c, x, t, kk))(jax.random.split(k, 100))))
            else:
                f = jax.jit(jb.online_grad(step, _mse, method))
            key = jax.random.key(1)
            args = (params, carry, xs, targets, key)
            grad = jax.flatten_util.ravel_pytree(f(*args)[1])[0]
            cosine = float(grad @ exact / (jnp.linalg.norm(grad) * jnp.linalg.norm(exact)))
            memory = f.lower(*args).compile().memory_analysis()
            rows.append({"cell": cell, "T": T, "B": B, "D": D, "H": H, "method": name, "cosine": cosine,
                         "ms_per_step": _time_ms(f, *args) / T,
                         "temp_mb": memory.temp_size_in_bytes / 1e6 if memory is not None else None})
    return rows


TRAINING_METHODS = {"exact BPTT": None, "RTRL": jb.RTRL(), "SnAp-1": jb.SnAp(1), "SnAp-2": jb.SnAp(2),
                    "UORO": jb.UORO(), "TBPTT(4)": jb.TBPTT(4, 4)}


def training_runs(steps: int = 1000, length: int = 12, batch: int = 16, H: int = 16, learning_rate: float = 3e-3,
                  methods=tuple(TRAINING_METHODS), seed: int = 0) -> list[dict]:
    """Adam on the adding problem (sequences of `length` steps, a fresh batch per step, the answer
    scored at the last step) with each method's gradient of each batch; the same initial params and
    batches for all. Per method: the loss per batch, the mean of the last tenth, and the seconds."""
    model = jb.with_readout(jb.elman(H), 1)
    k_init, k_data = jax.random.split(jax.random.key(seed))
    params, carry = model.init(k_init, 2), model.initial_carry((batch,))
    keys = jax.random.split(k_data, steps)
    optimizer = optax.adam(learning_rate)
    rows = []
    for name in methods:
        method = TRAINING_METHODS[name]
        if method is None:
            exact = jb.value_and_grad(model.step, jb.tasks.weighted_mse)
            grad_fn = lambda p, c, x, t, k: exact(p, c, x, t)
        else:
            grad_fn = jb.online_grad(model.step, jb.tasks.weighted_mse, method)

        def train(params, keys):
            def one(state, key):
                params, opt_state = state
                k_batch, k_method = jax.random.split(key)
                xs, targets = jb.tasks.adding(k_batch, batch, length)
                (loss, _), grads = grad_fn(params, carry, xs, targets, k_method)
                updates, opt_state = optimizer.update(grads, opt_state, params)
                return (optax.apply_updates(params, updates), opt_state), loss

            return lax.scan(one, (params, optimizer.init(params)), keys)[1]

        start = time.perf_counter()
        losses = np.asarray(jax.jit(train)(params, keys))
        rows.append({"method": name, "losses": losses, "final": float(np.mean(losses[-max(steps // 10, 1):])),
                     "seconds": time.perf_counter() - start, "steps": steps, "length": length, "batch": batch,
                     "H": H, "learning_rate": learning_rate})
    return rows


def plot_training(rows, path: str) -> None:
    """Loss curves of `training_runs` (moving means over a twentieth of the run), log scale, with
    the adding problem's baseline."""
    from jaxbptt._plot import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    window = max(len(rows[0]["losses"]) // 20, 1)
    for i, r in enumerate(rows):
        smooth = np.convolve(r["losses"], np.ones(window) / window, mode="valid")
        # thinner and dashed on top: curves that coincide (RTRL's is exact BPTT's) stay visible
        ax.plot(np.arange(smooth.size) + window, smooth, linestyle=("-", "--", ":", "-.")[i % 4],
                linewidth=max(3.0 - 0.45 * i, 0.8), label=f"{r['method']} ({r['final']:.3g})")
    ax.axhline(jb.tasks.ADDING_BASELINE_MSE, color="gray", linestyle="--", label="predict 1 (1/6)")
    r0 = rows[0]
    ax.set(yscale="log", xlabel="batch (one Adam step each)", ylabel=f"MSE, moving mean of {window}",
           title=f"adding problem, T={r0['length']}, Elman H={r0['H']}, batch {r0['batch']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def print_training(rows) -> None:
    r0 = rows[0]
    print(f"\n== training on the adding problem (T={r0['length']}, batch {r0['batch']}, Elman H={r0['H']}, "
          f"{r0['steps']} Adam steps at {r0['learning_rate']:g}; baseline MSE {jb.tasks.ADDING_BASELINE_MSE:.4f})")
    print(f"{'method':>11s} {'final MSE':>10s} {'seconds':>8s}")
    for r in rows:
        print(f"{r['method']:>11s} {r['final']:10.4f} {r['seconds']:8.1f}")


def print_balancing(rows) -> None:
    r0 = rows[0]
    print(f"\n== influence balancing (Tallec & Ollivier 2017): theta* = {r0['theta_star']:.4f}, start 0.5, "
          f"{r0['steps']} steps of online SGD at learning rate {r0['learning_rate']:g}, {r0['seeds']} seeds")
    print(f"{'method':>14s} {'mean theta':>12s} {'max |theta - theta*|':>21s} {'last step loss':>15s}")
    for r in rows:
        print(f"{r['method']:>14s} {r['theta']:12.4g} {r['error']:21.4g} {r['last_loss']:15.3e}")


def print_quality(rows) -> None:
    r0 = rows[0]
    print(f"\n== gradient quality against exact BPTT (T={r0['T']}, B={r0['B']}, D={r0['D']}, H={r0['H']}, float32)")
    print(f"{'cell':6s} {'method':>11s} {'cosine':>8s} {'ms / step':>10s} {'temp MB':>8s}")
    for r in rows:
        mem = f"{r['temp_mb']:8.2f}" if r["temp_mb"] is not None else f"{'-':>8s}"
        print(f"{r['cell']:6s} {r['method']:>11s} {r['cosine']:8.4f} {r['ms_per_step']:10.3f} {mem}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m examples.online_experiments", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of seconds")
    parser.add_argument("--figure", default="online_training.png", help="where to write the loss curves (PNG)")
    args = parser.parse_args(argv)
    balancing = influence_balancing(steps=300, seeds=2) if args.quick else influence_balancing()
    print_balancing(balancing)
    quality = gradient_quality(T=10, H=4) if args.quick else gradient_quality()
    print_quality(quality)
    training = training_runs(steps=20, length=6, batch=2, H=3) if args.quick else training_runs()
    print_training(training)
    plot_training(training, args.figure)
    print(f"loss curves: {args.figure}")
    return {"balancing": balancing, "quality": quality, "training": training}


if __name__ == "__main__":
    main()
