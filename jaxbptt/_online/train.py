"""`online`: training on a stream with an online gradient method (RTRL, SnAp, UORO) or truncated
BPTT, as pure `init` / `update` / `reset` functions."""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.flatten_util import ravel_pytree

from .. import _validate as v
from .._core.api import check_call, loss_dtype
from .._online.tbptt import online_tbptt
from .._online.grad import (DEFAULT_MAX_INFLUENCE_BYTES, TBPTT, UORO, check_influence, check_max_bytes, check_method,
                           make_tracker)
from .._types import LossFn, PyTree, StepFn


class OnlineGradState(NamedTuple):
    """The state of `online` between calls of `update` (a pytree: vmap over it).

    Attributes:
      params: the parameters, updated every `update_every` steps.
      opt_state: the optimizer's state.
      carry: the carry entering the next step.
      trace: the method's forward state, None before the first `update`: RTRL's influence,
        shape=(|params|, |carry|); SnAp's, the same or, where its pattern is sparse enough, only the
        pattern's entries, shape=(nnz,); UORO's pair (s~ shape=(|carry|,), theta~
        shape=(examples, |params|)).
      key: the UORO key (None for the other methods), folded with the step count at every step.
      steps: shape=(), dtype=int32, steps processed so far.
    """

    params: PyTree
    opt_state: PyTree
    carry: PyTree
    trace: Optional[PyTree]
    key: Optional[jax.Array]
    steps: jax.Array


class Online(NamedTuple):
    """An optax-style triple of pure functions: `state = init(params, carry, key=None)`,
    `state, losses = update(state, xs, targets)`, `state = reset(state, carry)`."""

    init: Callable
    update: Callable
    reset: Callable


def online(
    step: StepFn,
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    method,
    *,
    update_every: Optional[int] = None,
    max_influence_bytes: int = DEFAULT_MAX_INFLUENCE_BYTES,
) -> Online:
    """Online training on a stream: the method's gradient estimate of every step, summed over
    `update_every` steps, then one optimizer update; the method's influence carries across
    updates (as in Williams & Zipser's real-time learning, it then describes slightly older
    parameters). Roughly::

      for each chunk of update_every steps:
        grads = sum over the chunk of the method's estimate of dL_t/dparams (see `online_grad`)
        params = optimizer update of params with grads

    `update` is one `lax.scan`; calling it on two halves of a stream (each a multiple of
    `update_every` steps) equals one call on the whole. `reset(state, carry)` starts a new sequence:
    the new carry, a zero influence, the parameters and optimizer state kept.

    `method=jb.TBPTT(k1, k2)` is `jaxbptt.online_tbptt(..., truncation=(k1, k2))`, which updates
    every k1 steps; its state is an `OnlineState`.

    Args:
      step, loss_fn: as in `jaxbptt.value_and_grad`.
      optimizer: an `optax.GradientTransformation` (wrap it in `optax.inject_hyperparams` to vmap
        over learning rates).
      method: `jb.RTRL()`, `jb.SnAp(n)`, `jb.UORO()` or `jb.TBPTT(k1, k2)`.
      update_every: steps per parameter update, >= 1; default 1 (k1 for TBPTT, where any other
        value is an error).
      max_influence_bytes: as in `jaxbptt.online_grad`.

    Returns:
      `Online(init, update, reset)`: `init(params, carry, key=None) -> state` (UORO needs `key`);
      `update(state, xs, targets) -> (state, losses)`, `xs` and `targets` time-major with a length
      that is a multiple of `update_every`, `losses` of shape (T / update_every,): each chunk's
      summed loss; `reset(state, carry) -> state`.

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
    """
    v.check_callable("step", step)
    v.check_callable("loss_fn", loss_fn)
    check_method(method)
    check_max_bytes(max_influence_bytes)
    if update_every is not None and (isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1):
        raise ValueError(f"online needs update_every a positive int; got update_every={update_every!r}.")
    if isinstance(method, TBPTT):
        return _tbptt(step, loss_fn, optimizer, method, update_every)
    every = update_every or 1

    def tracker_for(params, carry, x):
        return make_tracker(step, loss_fn, method, params, carry, x, max_influence_bytes=max_influence_bytes)

    def init(params: PyTree, carry: PyTree, key: Optional[jax.Array] = None) -> OnlineGradState:
        if isinstance(method, UORO) and key is None:
            raise ValueError("online with method=jb.UORO() needs init(..., key=jax.random.key(...)); got key=None.")
        check_influence(method, params, carry, max_influence_bytes=max_influence_bytes)  # before any data
        return OnlineGradState(params, optimizer.init(params), carry, None, key, jnp.zeros((), jnp.int32))

    def update(state: OnlineGradState, xs: PyTree, targets: PyTree) -> tuple[OnlineGradState, jax.Array]:
        length, carry = check_call(step, loss_fn, 0, state.params, state.carry, xs, targets)
        if length % every:
            raise ValueError(f"online.update needs a number of steps that is a multiple of update_every={every}; "
                             f"xs has {length}.")
        tracker = tracker_for(state.params, carry, v.first_step(xs))
        c = ravel_pytree(carry)[0]
        trace = state.trace
        if trace is None:
            trace = tracker.init(ravel_pytree(state.params)[0], c)
        # the chunk's loss keeps one step's loss dtype, the carry and the params their own
        loss_type = loss_dtype(step, loss_fn, state.params, carry, xs, targets)

        def one_step(inner, inputs):
            theta, trace, c, steps, loss, grad = inner
            x, target = inputs
            key = jax.random.fold_in(state.key, steps) if state.key is not None else None
            trace, c, step_loss, step_grad = tracker.advance(theta, trace, c, x, target, key)
            return (theta, trace, c, steps + 1, loss + step_loss.astype(loss_type), grad + step_grad), None

        def chunk(outer, inputs):
            params, opt_state, trace, c, steps = outer
            theta = ravel_pytree(params)[0]
            start = (theta, trace, c, steps, jnp.zeros((), loss_type),
                     jnp.zeros_like(theta))
            (_, trace, c, steps, loss, grad), _ = lax.scan(one_step, start, inputs)
            grads = jax.tree.map(lambda g, p: g.astype(p.dtype), tracker.unravel_params(grad), params)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state, trace, c, steps), loss

        chunked = jax.tree.map(lambda a: a.reshape((length // every, every) + a.shape[1:]), (xs, targets))
        start = (state.params, state.opt_state, trace, c, state.steps)
        (params, opt_state, trace, c, steps), losses = lax.scan(chunk, start, chunked)
        return OnlineGradState(params, opt_state, tracker.unravel_carry(c), trace, state.key, steps), losses

    def reset(state: OnlineGradState, carry: PyTree) -> OnlineGradState:
        trace = jax.tree.map(jnp.zeros_like, state.trace)
        return state._replace(carry=carry, trace=trace)

    return Online(init, update, reset)


def _tbptt(step, loss_fn, optimizer, method: TBPTT, update_every) -> Online:
    if update_every is not None and update_every != method.k1:
        raise ValueError(f"online with method=jb.TBPTT(k1={method.k1}, k2={method.k2}) updates every k1 steps; "
                         f"got update_every={update_every}. Leave it out or pass {method.k1}.")
    trainer = online_tbptt(step, loss_fn, optimizer, truncation=(method.k1, method.k2))

    def init(params, carry, key=None):
        del key  # truncated BPTT is deterministic
        return trainer.init(params, carry)

    def reset(state, carry):
        # the history before the new sequence no longer exists: mark it invalid
        return state._replace(carry=carry, valid=jnp.zeros_like(state.valid))

    return Online(init, trainer.update, reset)
