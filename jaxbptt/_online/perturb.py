"""Perturbation estimators over an unroll: antithetic ES, persistent ES (PES) and noise-reuse ES
(NRES), for `online_grad` and `online`. They evaluate the step only forward, so they also serve
steps that autodiff cannot differentiate usefully (rounding, sampling, chaotic dynamics).

Common ground: `pairs` antithetic pairs of parameter perturbations `+eps_i, -eps_i`,
`eps_i ~ N(0, sigma^2 I)` over the flattened parameters; every particle (the unperturbed
parameters, then the `pairs` positive, then the `pairs` negative ones) runs the step on the same
inputs, vmapped, and the estimate of a window of steps is

    g = sum_i w_i (L_w(+i) - L_w(-i)) / (2 pairs sigma^2)

where `L_w(+-i)` is particle +-i's summed loss over the window and `w_i` the method's weight. The
methods differ in where each window's perturbed runs start, in when the noise is drawn, and in the
weight:

| method | perturbed runs start from | noise `eps_i` | weight `w_i` |
|---|---|---|---|
| ES (truncated in `online`) | the unperturbed carry | fresh every window | `eps_i` |
| PES | their own carries, kept across windows | fresh every window | `xi_i`, the sum of the episode's `eps_i` so far |
| NRES | their own carries, kept across windows | once per episode | `eps_i` |

This differs from `learned_optimization`'s `truncated_pes` in: 1. the window's loss is the sum of
its per-step losses, not their mean, as everywhere in jaxbptt; 2. the unperturbed particle runs
beside the perturbed ones, so the loss and carry returned are the unperturbed ones.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax

from .._validate import is_traced
from .call import final_value, per_step


def _check_fields(name, sigma, pairs, window=None, has_window=False) -> None:
    if isinstance(sigma, bool) or not (isinstance(sigma, (int, float)) or hasattr(sigma, "dtype")):
        raise TypeError(f"{name} needs sigma a float > 0 (the perturbations' standard deviation); got sigma={sigma!r}.")
    if not is_traced(sigma) and not float(sigma) > 0:
        raise ValueError(f"{name} needs sigma > 0 (the perturbations' standard deviation); got sigma={float(sigma)!r}.")
    if isinstance(pairs, bool) or not isinstance(pairs, int) or pairs < 1:
        raise ValueError(f"{name} needs pairs a positive int (antithetic pairs of perturbations); got pairs={pairs!r}.")
    if has_window and window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"{name} needs window None (the whole sequence) or a positive int (steps per window); "
                         f"got window={window!r}.")


class _ESFields(NamedTuple):
    sigma: float
    pairs: int = 1


class ES(_ESFields):
    """Antithetic evolution strategies (Salimans et al. 2017) over the whole unroll: one noise
    `eps_i ~ N(0, sigma^2 I)` per pair for the whole sequence,

        g = sum_i eps_i (L(theta + eps_i) - L(theta - eps_i)) / (2 pairs sigma^2),

    an unbiased estimate of the gradient of the Gaussian-smoothed loss
    `E_eps[L(theta + eps)]` (for a loss quadratic in theta, of the loss's own gradient). In
    `jaxbptt.online` it is truncated ES: fresh noise every window, both perturbed runs started from
    the unperturbed carry, so it sees only the window's own influence (biased, as truncated BPTT).

    Attributes:
      sigma: the perturbations' standard deviation, > 0 (a float or a traced scalar).
      pairs: antithetic pairs, >= 1; memory O(pairs x (carry + params)), time 2 pairs + 1 runs.
    """

    def __new__(cls, sigma, pairs: int = 1):
        _check_fields("ES", sigma, pairs)
        return super().__new__(cls, sigma, pairs)


class _WindowFields(NamedTuple):
    sigma: float
    pairs: int = 1
    window: Optional[int] = None


class PES(_WindowFields):
    """Persistent evolution strategies (Vicol, Metz, Sohl-Dickstein, ICML 2021). The sequence is
    cut into windows (`window` steps in `online_grad`, None meaning the whole sequence; the
    `update_every` steps of an update in `online`). Each pair keeps its two perturbed carries across
    windows and the sum `xi_i` of the noises it has used in this episode; in window k, with fresh
    noise `eps_i`::

        xi_i <- xi_i + eps_i
        run theta + eps_i from carry(+i) and theta - eps_i from carry(-i) over the window
        g_k = sum_i xi_i (L_k(+i) - L_k(-i)) / (2 pairs sigma^2)

    The sum of `g_k` over the episode is unbiased for the gradient of the smoothed loss of the whole
    unroll (each window's loss depends on every noise used so far, which `xi_i` accounts for), so
    truncation does not bias it; its variance grows with the number of windows. `reset` starts a
    new episode (perturbed carries replaced, `xi = 0`).

    Attributes:
      sigma: the perturbations' standard deviation, > 0.
      pairs: antithetic pairs, >= 1.
      window: steps per window in `online_grad` (None: the whole sequence, which is ES); in
        `online`, None or equal to `update_every`.
    """

    def __new__(cls, sigma, pairs: int = 1, window: Optional[int] = None):
        _check_fields("PES", sigma, pairs, window, has_window=True)
        return super().__new__(cls, sigma, pairs, window)


class NRES(_WindowFields):
    """Noise-reuse evolution strategies (Li, Harrison, Sohl-Dickstein, Smith, Metz, NeurIPS 2023):
    as PES, each pair keeps its perturbed carries across windows, but draws its noise once per
    episode and reuses it in every window::

        (at the episode's first window) eps_i ~ N(0, sigma^2 I)
        run theta + eps_i from carry(+i) and theta - eps_i from carry(-i) over the window
        g_k = sum_i eps_i (L_k(+i) - L_k(-i)) / (2 pairs sigma^2)

    Unbiased like PES, with the least variance among such online estimators (Li et al.); with
    parameters fixed over the episode (`online_grad`) the sum over windows is ES over the whole
    sequence. `reset` starts a new episode (perturbed carries replaced, the next window draws).

    Attributes:
      sigma, pairs, window: as in `PES`.
    """

    def __new__(cls, sigma, pairs: int = 1, window: Optional[int] = None):
        _check_fields("NRES", sigma, pairs, window, has_window=True)
        return super().__new__(cls, sigma, pairs, window)


PERTURBATIONS = (ES, PES, NRES)


class Population(NamedTuple):
    """What PES and NRES keep between windows (ES keeps nothing: `Population(None, None, None)`).

    Attributes:
      carries: the perturbed carries, every leaf shape=(2 pairs, *leaf shape): the `+eps_i`, then
        the `-eps_i` particles.
      noise: shape=(pairs, |params|), params dtype: PES's accumulated `xi`, NRES's episode noise.
      drawn: shape=(), bool: NRES's noise drawn for this episode (None for PES).
    """

    carries: object
    noise: Optional[jax.Array]
    drawn: Optional[jax.Array]


def init_population(method, theta, carry) -> Population:
    """The state of a new episode starting from `carry`."""
    if isinstance(method, ES):
        return Population(None, None, None)
    carries = jax.tree.map(lambda c: jnp.broadcast_to(c, (2 * method.pairs,) + jnp.shape(c)), carry)
    noise = jnp.zeros((method.pairs, theta.size), theta.dtype)
    return Population(carries, noise, jnp.zeros((), bool) if isinstance(method, NRES) else None)


def window(method, unroll_losses, theta, population: Population, carry, key):
    """One window: the noise, the particles' runs and the estimate.

    `unroll_losses(thetas, carries) -> (carries, losses)` runs each particle (leading axis) over
    the window. Returns `(population, carry, loss, grad, weight, ends)`: the unperturbed carry and
    summed loss, the estimate (params dtype), the weight `w` used, and every particle's end carry
    (unperturbed first), which a final loss of the window reads."""
    pairs = method.pairs
    fresh = method.sigma * jax.random.normal(key, (pairs, theta.size), theta.dtype)
    if isinstance(method, ES):
        eps, weight = fresh, fresh
        starts = jax.tree.map(lambda c: jnp.broadcast_to(c, (2 * pairs,) + jnp.shape(c)), carry)
    elif isinstance(method, PES):
        eps, starts = fresh, population.carries
        weight = population.noise + fresh
    else:
        eps = jnp.where(population.drawn, population.noise, fresh)
        weight, starts = eps, population.carries
    thetas = jnp.concatenate([theta[None], theta[None] + eps, theta[None] - eps])
    particles = jax.tree.map(lambda c, s: jnp.concatenate([c[None], s]), carry, starts)
    ends, losses = unroll_losses(thetas, particles)
    grad = estimate(method, weight, losses)
    if isinstance(method, PES):
        population = Population(_perturbed(ends), weight, None)
    elif isinstance(method, NRES):
        population = Population(_perturbed(ends), eps, jnp.ones((), bool))
    return population, jax.tree.map(lambda e: e[0], ends), losses[0], grad, weight, ends


def _perturbed(ends):
    return jax.tree.map(lambda e: e[1:], ends)


def estimate(method, weight, losses):
    """`sum_i w_i (L(+i) - L(-i)) / (2 pairs sigma^2)` from the particles' losses (unperturbed first)."""
    pairs = method.pairs
    delta = (losses[1:pairs + 1] - losses[pairs + 1:]).astype(weight.dtype)
    return jnp.sum(weight * delta[:, None], axis=0) / (2 * pairs * method.sigma**2)


def final_through_particles(method, final_loss, loss_type, ends, weight, loss, grad):
    """A window's final loss: its value at the unperturbed end carry, and its estimate from every
    particle's end carry with the window's weight."""
    if final_loss is None:
        return loss, grad
    finals = jax.vmap(lambda c: final_value(final_loss, c, loss_type))(ends)
    return loss + finals[0], grad + estimate(method, weight, finals)


def particle_unroll(step, loss_fn, unravel, loss_type):
    """`unroll_losses(thetas, carries, xs, targets) -> (carries, losses)`: each particle's run over
    the steps of `xs`, its per-step losses summed in `loss_type`, vmapped over particles."""

    def one(theta, carry, xs, targets):
        params = unravel(theta)

        def body(state, inputs):
            c, total = state
            x, target = inputs
            c, y = step(params, c, x)
            return (c, total + loss_fn(y, target).astype(loss_type)), None

        (carry, total), _ = lax.scan(body, (carry, jnp.zeros((), loss_type)), (xs, targets))
        return carry, total

    return jax.vmap(one, in_axes=(0, 0, None, None))


def sequence_grad(method, step, loss_fn, final_loss, theta, unravel, carry, xs, targets, key, length, loss_type):
    """`online_grad`'s estimate with the parameters fixed: ES over the whole sequence, PES and NRES
    window by window, window j's noise from `fold_in(key, first step of window j)` (as `online`
    folds its key with the step count); a final loss counts in the last window. Returns
    `(loss, final carry, grad)`, all unperturbed but the estimate."""
    width = length if isinstance(method, ES) or method.window is None else min(method.window, length)
    full, rest = divmod(length, width)
    run = particle_unroll(step, per_step(loss_fn, loss_type), unravel, loss_type)

    def one_window(state, inputs):
        population, c, loss, grad, _, _ = state
        xs_w, targets_w, first = inputs
        population, c, w_loss, w_grad, weight, ends = window(
            method, lambda th, cs: run(th, cs, xs_w, targets_w), theta, population, c, jax.random.fold_in(key, first))
        return (population, c, loss + w_loss, grad + w_grad, weight, ends), None

    particles = jax.tree.map(lambda c: jnp.broadcast_to(c, (2 * method.pairs + 1,) + jnp.shape(c)), carry)
    state = (init_population(method, theta, carry), carry, jnp.zeros((), loss_type), jnp.zeros_like(theta),
             jnp.zeros((method.pairs, theta.size), theta.dtype), particles)
    windows = jax.tree.map(lambda a: a[:full * width].reshape((full, width) + a.shape[1:]), (xs, targets))
    state, _ = lax.scan(one_window, state, (*windows, jnp.arange(full) * width))
    if rest:
        tail = jax.tree.map(lambda a: a[full * width:], (xs, targets))
        state, _ = one_window(state, (*tail, full * width))
    _, carry, loss, grad, weight, ends = state
    # the final loss is a loss of the last window
    loss, grad = final_through_particles(method, final_loss, loss_type, ends, weight, loss, grad)
    return loss, carry, grad
