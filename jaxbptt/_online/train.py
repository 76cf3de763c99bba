"""`online`: training on a stream with an online gradient method (RTRL, SnAp, UORO), a
perturbation estimator (ES, PES, NRES) or truncated BPTT, as pure `init` / `update` / `reset`
functions."""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.flatten_util import ravel_pytree

from .. import _validate as v
from .._types import LossFn, PyTree, StepFn
from .call import avals, check_optimizer, check_stream, check_stream_shapes, losses, per_step
from .grad import (DEFAULT_MAX_INFLUENCE_BYTES, KEYED, TBPTT, SnAp, UORO, check_influence, check_max_bytes,
                   check_method, final_through_influence, make_tracker)
from .perturb import PERTURBATIONS, final_through_particles, init_population, particle_unroll, window
from .tbptt import online_tbptt


class OnlineGradState(NamedTuple):
    """The state of `online` between calls of `update` (a pytree: vmap over it, or carry it through
    a `lax.scan` of `update`: its structure, shapes and dtypes are fixed by `init`).

    Attributes:
      params: the parameters, updated every `update_every` steps.
      opt_state: the optimizer's state.
      carry: the carry entering the next step (the unperturbed one, for the perturbation methods).
      trace: the method's forward state: RTRL's influence, shape=(|params|, |carry|); SnAp's, the
        same or, where its pattern is sparse enough, only the pattern's entries, shape=(nnz,);
        UORO's pair (s~ shape=(|carry|,), theta~ shape=(examples, |params|)); for PES and NRES a
        `Population` (the perturbed carries, the accumulated or reused noise), for ES an empty one.
      key: the key of the random methods (None for the others), folded with the step count.
      steps: shape=(), dtype=int32, steps processed so far.
    """

    params: PyTree
    opt_state: PyTree
    carry: PyTree
    trace: PyTree
    key: Optional[jax.Array]
    steps: jax.Array


class Online(NamedTuple):
    """An optax-style triple of pure functions: `state = init(params, carry, xs=None, key=None)`,
    `state, losses = update(state, xs, targets=None)`, `state = reset(state, carry, xs=None)`."""

    init: Callable
    update: Callable
    reset: Callable


def online(
    step: StepFn,
    loss_fn: Optional[LossFn],
    optimizer: optax.GradientTransformation,
    method,
    *,
    update_every: Optional[int] = None,
    final_loss: Optional[Callable] = None,
    max_influence_bytes: int = DEFAULT_MAX_INFLUENCE_BYTES,
) -> Online:
    """Online training on a stream: the method's gradient estimate of every window of
    `update_every` steps, then one optimizer update; the method's state carries across updates
    (as in Williams & Zipser's real-time learning, it then describes slightly older parameters).
    Roughly::

      for each window of update_every steps:
        loss = sum over the window of loss_fn(y_t, target_t), + final_loss(carry at its end)
        grads = the method's estimate of d loss / d params (see `online_grad`)
        params = optimizer update of params with grads

    The influence methods (RTRL, SnAp, UORO) sum their per-step estimates and add the window's
    final loss through the influence at its end. The perturbation methods estimate each window's
    loss from `2 pairs + 1` runs: `jb.ES` is truncated ES (fresh noise, perturbed runs started from
    the unperturbed carry: biased like truncated BPTT), `jb.PES` and `jb.NRES` keep their perturbed
    carries and noise across windows (unbiased for the whole episode's smoothed loss). An episode
    ends with `reset`.

    `final_loss` is a loss of the carry at the end of every window: the objective is then
    `sum over windows of final_loss(carry at the window's end)` (with one window per episode, the
    episode's final loss; for a loss only at the episode's end, put it in `loss_fn` with a weight
    in the targets instead).

    `update` is one `lax.scan`; calling it on two halves of a stream (each a multiple of
    `update_every` steps) equals one call on the whole, and its state keeps the structure `init`
    gave it, so a `lax.scan` of `update` works. `reset(state, carry)` starts a new sequence (a new
    episode): the new carry, a zero influence (or new perturbed carries, zero noise), the
    parameters and optimizer state kept. A stream keeps its batch; `reset(state, carry, xs)` with a
    carry and sample of another batch starts a stream of that batch.

    `method=jb.TBPTT(k1, k2)` is `jaxbptt.online_tbptt(..., truncation=(k1, k2))`, which updates
    every k1 steps; its state is an `OnlineState`.

    Args:
      step, loss_fn: as in `jaxbptt.online_grad` (`loss_fn` may be None with a `final_loss`).
      optimizer: an `optax.GradientTransformation` (wrap it in `optax.inject_hyperparams` to vmap
        over learning rates).
      method: `jb.RTRL()`, `jb.SnAp(n)`, `jb.UORO()`, `jb.ES(...)`, `jb.PES(...)`, `jb.NRES(...)`
        or `jb.TBPTT(k1, k2)`.
      update_every: steps per parameter update (the perturbation methods' window), >= 1; default
        the method's `window` for PES and NRES, else 1 (k1 for TBPTT, where any other value is an
        error).
      final_loss: `final_loss(carry) -> scalar`, added at the end of every window (see above).
      max_influence_bytes: as in `jaxbptt.online_grad`.

    Returns:
      `Online(init, update, reset)`:

      - `init(params, carry, xs=None, key=None) -> state`: UORO, ES, PES and NRES need `key`;
        SnAp and UORO read their structure from one step of the stream and TBPTT sizes its input
        history from it, so they need `xs` (a sample: only its shapes and dtypes are read).
      - `update(state, xs, targets=None) -> (state, losses)`, `xs` and `targets` time-major with a
        length that is a multiple of `update_every`, `losses` of shape (T / update_every,): each
        window's summed (unperturbed) loss.
      - `reset(state, carry, xs=None) -> state`.

    Raises:
      TypeError: as `online_grad`, and for an optimizer that is not an optax transformation.
      ValueError: as `online_grad`, and for a missing `key` or `xs` at `init`, a stream whose batch
        does not fit the state, or an `update_every` other than a PES or NRES `window`.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, jaxbptt as jb
      >>> model = jb.with_readout(jb.elman(4), 1)
      >>> trainer = jb.online(model.step, lambda y, t: jnp.mean((y - t) ** 2), optax.sgd(0.1), jb.RTRL(),
      ...                     update_every=5)
      >>> state = trainer.init(model.init(jax.random.key(0), 1), model.initial_carry((2,)))
      >>> xs = jnp.sin(jnp.arange(20, dtype=jnp.float32))[:, None, None] * jnp.ones((20, 2, 1), jnp.float32)
      >>> state, losses = jax.jit(trainer.update)(state, xs, xs)
      >>> losses.shape, int(state.steps)
      ((4,), 20)

    Persistent ES, one episode of 20 steps per `update` call, then a new episode:

      >>> pes = jb.online(model.step, lambda y, t: jnp.mean((y - t) ** 2), optax.sgd(0.01), jb.PES(0.01, pairs=4),
      ...                 update_every=5)
      >>> state = pes.init(model.init(jax.random.key(0), 1), model.initial_carry((2,)), key=jax.random.key(1))
      >>> def episode(state, _):
      ...     state, losses = pes.update(state, xs, xs)
      ...     return pes.reset(state, model.initial_carry((2,))), losses
      >>> state, losses = jax.lax.scan(episode, state, None, length=3)
      >>> losses.shape
      (3, 4)
    """
    v.check_callable("step", step)
    spec = losses(loss_fn, final_loss)
    check_optimizer("online", optimizer)
    check_method(method)
    check_max_bytes(max_influence_bytes)
    if update_every is not None and (isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1):
        raise ValueError(f"online needs update_every a positive int; got update_every={update_every!r}.")
    if isinstance(method, TBPTT):
        return _tbptt(step, loss_fn, optimizer, method, update_every, final_loss)
    window_of = getattr(method, "window", None)
    if window_of is not None and update_every is not None and update_every != window_of:
        raise ValueError(f"online with method=jb.{type(method).__name__}(window={window_of}) estimates one window per "
                         f"update; got update_every={update_every}. Leave one of them out or make them equal.")
    every = update_every or window_of or 1
    perturbation = isinstance(method, PERTURBATIONS)

    def tracker_for(params, carry, xs, loss_type):
        x = None if xs is None else v.first_step(xs)
        return make_tracker(step, per_step(loss_fn, loss_type), method, params, carry, x,
                            max_influence_bytes=max_influence_bytes)

    def new_trace(params, carry, xs):
        """The method's state for a new sequence from `carry`."""
        theta = ravel_pytree(params)[0]
        if perturbation:
            return init_population(method, theta, carry)
        # the trace's shapes and dtypes do not depend on the loss's dtype
        return tracker_for(params, carry, xs, jnp.float32).init(theta, ravel_pytree(carry)[0])

    def as_carry(params, carry, xs):
        """The carry as arrays of fixed dtypes: the step's own, where a sample of `xs` shows them."""
        if xs is not None:
            return v.check_carry(step, params, carry, xs)
        return jax.tree.map(lambda c: jnp.asarray(c, jnp.asarray(c).dtype), carry)

    def init(params: PyTree, carry: PyTree, xs: Optional[PyTree] = None, key: Optional[jax.Array] = None):
        if isinstance(method, KEYED) and key is None:
            raise ValueError(f"online with method=jb.{type(method).__name__}(...) needs "
                             "init(..., key=jax.random.key(...)) (its random numbers); got key=None.")
        if isinstance(method, (SnAp, UORO)) and xs is None:
            raise ValueError(f"online with method=jb.{type(method).__name__}(...) reads the step's structure from one "
                             "step of the stream: pass init(params, carry, xs=sample) with a sample of the stream (only "
                             "its shapes and dtypes are read); got xs=None.")
        if not perturbation:
            check_influence(method, params, carry, max_influence_bytes=max_influence_bytes)  # before any data
        carry = as_carry(params, carry, xs)
        return OnlineGradState(params, optimizer.init(params), carry, new_trace(params, carry, xs), key,
                               jnp.zeros((), jnp.int32))

    def update(state: OnlineGradState, xs: PyTree, targets: Optional[PyTree] = None):
        check_stream_shapes("online.update", step, state.params, state.carry, xs)
        call = check_stream(step, spec, state.params, state.carry, xs, targets)
        length, carry, loss_type = call.length, call.carry, call.loss_dtype
        if length % every:
            raise ValueError(f"online.update needs a number of steps that is a multiple of update_every={every}; "
                             f"xs has {length}.")
        theta0, unravel = ravel_pytree(state.params)
        if perturbation:
            run = particle_unroll(step, per_step(loss_fn, loss_type), unravel, loss_type)
            _check_trace(state.trace, jax.eval_shape(lambda: init_population(method, theta0, carry)))
        else:
            tracker = tracker_for(state.params, carry, xs, loss_type)
            _check_trace(state.trace, jax.eval_shape(tracker.init, theta0, ravel_pytree(carry)[0]))

        def chunk(outer, inputs):
            params, opt_state, trace, c, steps = outer
            xs_w, targets_w = inputs
            theta = ravel_pytree(params)[0]
            if perturbation:
                key = jax.random.fold_in(state.key, steps)
                trace, c, loss, grad, weight, ends = window(
                    method, lambda th, cs: run(th, cs, xs_w, targets_w), theta, trace, c, key)
                loss, grad = final_through_particles(method, final_loss, loss_type, ends, weight, loss, grad)
            else:
                trace, c, loss, grad = _influence_window(tracker, theta, trace, c, xs_w, targets_w, steps, state.key,
                                                         loss_type)
            grads = jax.tree.map(lambda g, p: g.astype(p.dtype), unravel(grad), params)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state, trace, c, steps + every), loss

        chunked = jax.tree.map(lambda a: a.reshape((length // every, every) + a.shape[1:]), (xs, targets))
        c = carry if perturbation else ravel_pytree(carry)[0]
        start = (state.params, state.opt_state, state.trace, c, state.steps)
        (params, opt_state, trace, c, steps), losses = lax.scan(chunk, start, chunked)
        c = c if perturbation else tracker.unravel_carry(c)
        return OnlineGradState(params, opt_state, c, trace, state.key, steps), losses

    def _influence_window(tracker, theta, trace, c, xs_w, targets_w, steps, key, loss_type):
        def one_step(inner, inputs):
            trace, c, t, loss, grad = inner
            x, target = inputs
            k = jax.random.fold_in(key, t) if key is not None else None
            trace, c, step_loss, step_grad = tracker.advance(theta, trace, c, x, target, k)
            return (trace, c, t + 1, loss + step_loss, grad + step_grad), None

        start = (trace, c, steps, jnp.zeros((), loss_type), jnp.zeros_like(theta))
        (trace, c, _, loss, grad), _ = lax.scan(one_step, start, (xs_w, targets_w))
        loss, grad = final_through_influence(tracker, final_loss, trace, c, loss, grad)
        return trace, c, loss, grad

    def reset(state: OnlineGradState, carry: PyTree, xs: Optional[PyTree] = None) -> OnlineGradState:
        carry = as_carry(state.params, carry, xs)
        same = avals(carry) == avals(state.carry)
        if xs is None and not same and isinstance(method, (SnAp, UORO)):
            raise ValueError(f"online.reset with a carry of another shape needs xs, a sample of the new stream, to "
                             f"read jb.{type(method).__name__}'s structure: reset(state, carry, xs).")
        if xs is None and same and not perturbation:
            return state._replace(carry=carry, trace=jax.tree.map(jnp.zeros_like, state.trace))
        return state._replace(carry=carry, trace=new_trace(state.params, carry, xs))

    return Online(init, update, reset)


def _check_trace(trace, fresh) -> None:
    """The state's trace must be shaped for the stream's carry (`reset` rebuilds it for another)."""
    if avals(trace) != avals(fresh):
        raise ValueError("online.update: the state's trace does not fit this carry and stream (was the carry replaced "
                         "by one of another batch?). Start a stream with another batch with reset(state, carry, xs).")


def _tbptt(step, loss_fn, optimizer, method: TBPTT, update_every, final_loss) -> Online:
    if update_every is not None and update_every != method.k1:
        raise ValueError(f"online with method=jb.TBPTT(k1={method.k1}, k2={method.k2}) updates every k1 steps; "
                         f"got update_every={update_every}. Leave it out or pass {method.k1}.")
    trainer = online_tbptt(step, loss_fn, optimizer, truncation=(method.k1, method.k2), final_loss=final_loss)

    def init(params, carry, xs=None, key=None):
        del key  # truncated BPTT is deterministic
        if xs is None:  # online_tbptt would size its input history at the first update
            raise ValueError("online with method=jb.TBPTT(k1, k2) keeps the last k2 - k1 inputs: pass "
                             "init(params, carry, xs=sample) with a sample of the stream (only its shapes and dtypes "
                             "are read), so that the state's structure is fixed from init; got xs=None.")
        return trainer.init(params, carry, xs)

    return Online(init, trainer.update, trainer.reset)
