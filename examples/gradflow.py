"""`python -m examples.gradflow`: the vanishing / exploding gradient picture, measured.

One random input sequence of T steps drives six recurrent cells; the loss is the sum of the last
step's output, so the gradient flows back from step T - 1 only. For every cell the reverse scan
records `||dL / d h_t||`, the norm of the cotangent of the carry entering step t, and the demo
prints it at a few steps, fits its geometric rate per step, and plots all runs on a log scale:
- tanh with an orthogonal recurrent matrix: the norm decays geometrically back through time;
- tanh with a large random matrix (N(0, 9/H) entries, the chaotic regime): it grows geometrically;
- IRNN (ReLU with identity initialisation): it stays of the same order;
- LSTM and GRU: gated, with their default initialisation;
- the large tanh again with `clip_norm=1`: per-step clipping caps the growth at every step.
Runs in float64, so that neither the growth nor the decay leaves the floating-point range.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import jaxbptt as jb


def runs(steps: int = 200, hidden: int = 64, inputs: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    """Per-step adjoint norms of each demo run, label -> array of shape (steps,)."""
    cells = {
        "tanh, orthogonal W": (jb.elman(hidden), None),
        "tanh, large normal W (x3)": (jb.elman(hidden, recurrent_init="normal", recurrent_scale=3.0), None),
        "IRNN (ReLU, identity W)": (jb.elman(hidden, activation="relu", recurrent_init="identity"), None),
        "LSTM": (jb.lstm(hidden), None),
        "GRU": (jb.gru(hidden), None),
        "tanh, large normal W, clip_norm=1": (jb.elman(hidden, recurrent_init="normal", recurrent_scale=3.0), 1.0),
    }
    key_params, key_inputs = jax.random.split(jax.random.key(seed))
    xs = jax.random.normal(key_inputs, (steps, inputs), jnp.float64)
    out = {}
    for label, (cell, clip) in cells.items():
        params = cell.init(key_params, inputs, jnp.float64)

        def loss(params, probe, cell=cell, clip=clip):
            _, ys = jb.unroll(cell.step, params, cell.initial_carry((), jnp.float64), xs, clip_norm=clip, probe=probe)
            return jnp.sum(ys[-1])

        _, diag = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, jb.diagnostics_probe(steps))
        out[label] = np.asarray(diag.adjoint_norm)
    return out


def rate_per_step(norms: np.ndarray) -> float:
    """exp of the least-squares slope of log(norm) against t: < 1 decays back in time, > 1 grows."""
    t = np.arange(len(norms))
    ok = norms > 0
    slope = np.polyfit(t[ok], np.log(norms[ok]), 1)[0]
    return float(np.exp(-slope))  # going back in time is decreasing t


def main(argv=None) -> dict[str, np.ndarray]:
    parser = argparse.ArgumentParser(prog="python -m examples.gradflow", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gradflow.png", help="where to write the plot (PNG)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    jax.config.update("jax_enable_x64", True)
    results = runs(args.steps, args.hidden, seed=args.seed)
    T = args.steps
    marks = [T - 1, (3 * T) // 4, T // 2, T // 4, 0]
    print(f"||dL/dh_t|| for L = sum(y_{T - 1}), one random sequence, T={T}, H={args.hidden}, float64")
    print(f"{'run':36s}" + "".join(f"{'t=' + str(t):>11s}" for t in marks) + f"{'rate/step':>11s}")
    for label, norms in results.items():
        print(f"{label:36s}" + "".join(f"{norms[t]:11.2e}" for t in marks) + f"{rate_per_step(norms):11.3f}")
    print("rate/step: the factor by which the norm changes per step back in time (fitted).")
    jb.plot_gradient_flow(results, args.out, title=f"Gradient flow back through time (T={T}, H={args.hidden})")
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
