"""`online_tbptt`: Williams & Peng (k1, k2) truncated BPTT as compiled online training."""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from jax import lax

from .._core import layout as _layout
from .. import _validate as v
from .._cells.combinators import masked
from .._types import LossFn, PyTree, StepFn
from .._core.api import unroll as _unroll
from .call import avals, check_optimizer, check_stream, check_stream_shapes, losses


class OnlineState(NamedTuple):
    """The state of `online_tbptt` between calls of `update` (a pytree: vmap over it).

    Attributes:
      params: the parameters, updated after every chunk of k1 steps.
      opt_state: the optimizer's state.
      carry: the carry entering the next window, as the last window's forward pass computed it.
      history: the k2 - k1 inputs preceding the next chunk, time-major, shape=(k2 - k1, ...); None
        until the first `update` when `init` was given no sample of the inputs.
      valid: shape=(k2 - k1,), dtype=bool, whether each history step exists (False before t = 0).
      chunks: shape=(), dtype=int32, chunks processed so far.
    """

    params: PyTree
    opt_state: PyTree
    carry: PyTree
    history: Optional[PyTree]
    valid: jax.Array
    chunks: jax.Array


class OnlineTBPTT(NamedTuple):
    """Pure functions in the optax style: `state = init(params, carry, xs)`,
    `state, losses = update(state, xs, targets)` (`state, losses, ys` with `return_outputs=True`),
    and `state = reset(state, carry, xs=None)` to start a new stream with the same parameters."""

    init: Callable[..., OnlineState]
    update: Callable[..., tuple]
    reset: Callable[..., OnlineState]


def online_tbptt(
    step: StepFn,
    loss_fn: Optional[LossFn],
    optimizer: optax.GradientTransformation,
    *,
    truncation,
    final_loss: Optional[Callable] = None,
    clip_norm=None,
    unroll: int = 1,
    time_axis: int = 0,
    return_outputs: bool = False,
) -> OnlineTBPTT:
    """Online training with truncated BPTT(k1, k2) (Williams & Peng 1990), one compiled scan.

    The stream is cut into chunks of k1 steps. After each chunk the parameters are updated with the
    gradient of that chunk's losses, backpropagated through a window of the last k2 steps; the
    window re-runs from the carry that the previous window's forward pass computed at its start, with
    the parameters now in effect. Roughly::

      for each chunk j of k1 steps:
        window = the k2 steps ending with chunk j (fewer at the start of the stream)
        grads = grad of sum(loss_fn(y_t, target_t) for t in chunk j) + final_loss(carry at the
                chunk's end), re-running the window from stop_gradient(carry at the window's start)
        params = optimizer update of params with grads

    `update` is one `lax.scan` over chunks; its memory does not grow with T beyond `xs` itself, and
    calling it on two halves of a stream (each a multiple of k1 steps) equals one call on the whole.

    Args:
      step, loss_fn: as in `jaxbptt.value_and_grad`; `loss_fn` may be None with a `final_loss`.
      optimizer: an `optax.GradientTransformation` (wrap it in `optax.inject_hyperparams` to vmap over
        learning rates).
      truncation: `(k1, k2)` with 1 <= k1 <= k2, or an int k meaning `(k, k)`.
      final_loss: `final_loss(carry) -> scalar`, a loss of the carry at the end of every chunk (a
        meta-objective evaluated after every k1 steps), or None.
      clip_norm, unroll: as in `jaxbptt.unroll`, applied inside every window.
      time_axis: 0 for time-major `xs` and `targets`, 1 for batch-major (`(batch, T, ...)`).
      return_outputs: `update` also returns the outputs `ys` of every step, as its chunk's window
        computed them (with the parameters in effect before the chunk's update), in the layout of
        `xs`: for metrics on the fly, with no second forward pass.

    Returns:
      `OnlineTBPTT(init, update, reset)`:

      - `init(params, carry, xs=None) -> state`; `xs` is a sample of the stream (any length, in
        the trainer's layout; only its shapes and dtypes are read) that sizes the input history, so
        that `jax.jit(update)` compiles once for a stream of fixed shapes. Without it the history
        is allocated by the first `update`, which then compiles a second time.
      - `update(state, xs, targets=None) -> (state, losses)`, with a length that is a multiple of
        k1; `losses` of shape (T / k1,): each chunk's loss per step (its summed loss, final loss
        included, over k1). The gradient is that of the summed loss, as in Williams & Peng.
        `targets` may be None (each step's target is then None). A stream keeps the batch it
        started with: another batch is an error (start it with `reset(state, carry, xs)`).
      - `reset(state, carry, xs=None) -> state`: a new stream: the carry is replaced and the
        history emptied (sized for `xs` when given: a stream of another batch); parameters,
        optimizer state and the chunk count are kept.

    Raises:
      TypeError / ValueError: for an optimizer that is not an optax transformation, a truncation
        out of range, no loss at all, a stream whose length is not a multiple of k1 or whose
        batch does not fit the state.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, jaxbptt as jb
      >>> model = jb.with_readout(jb.gru(16), 1)
      >>> trainer = jb.online_tbptt(model.step, lambda y, t: jnp.mean((y - t) ** 2), optax.sgd(0.1),
      ...                           truncation=(4, 12))
      >>> xs = (jnp.sin(jnp.arange(40.0))[:, None, None] * jnp.ones((40, 8, 1))).astype(jnp.float32)
      >>> state = trainer.init(model.init(jax.random.key(0), 1), model.initial_carry((8,)), xs)
      >>> update = jax.jit(trainer.update)
      >>> state, losses = update(state, xs, xs)
      >>> losses.shape, int(state.chunks)
      ((10,), 10)
      >>> state, losses = update(trainer.reset(state, model.initial_carry((8,))), xs, xs)  # a new stream
      >>> update._cache_size()
      1
    """
    v.check_callable("step", step)
    spec = losses(loss_fn, final_loss)
    check_optimizer("online_tbptt", optimizer)
    if isinstance(truncation, int) and not isinstance(truncation, bool):
        v.check_truncation(truncation)
        truncation = (truncation, truncation)
    if not isinstance(truncation, tuple):
        raise TypeError(f"online_tbptt needs truncation=(k1, k2) of Python ints (or an int k); got truncation={truncation!r}.")
    v.check_truncation(truncation)
    v.check_clip_norm(clip_norm)
    _layout.check_time_axis(time_axis)
    k1, k2 = truncation
    span = k2 - k1
    window_step = masked(step)

    def recording_step(params, carry, inputs):
        carry, y = window_step(params, carry, inputs)
        return carry, (y, carry)

    def empty_history(xs):
        return jax.tree.map(lambda x: jnp.zeros((span,) + x.shape[1:], x.dtype), _layout.time_major(xs, time_axis))

    def init(params: PyTree, carry: PyTree, xs: Optional[PyTree] = None) -> OnlineState:
        history = None if xs is None else empty_history(xs)
        return OnlineState(params, optimizer.init(params), carry, history, jnp.zeros((span,), bool),
                           jnp.zeros((), jnp.int32))

    def reset(state: OnlineState, carry: PyTree, xs: Optional[PyTree] = None) -> OnlineState:
        if xs is not None:
            history = empty_history(xs)
        else:
            history = None if state.history is None else jax.tree.map(jnp.zeros_like, state.history)
        return state._replace(carry=carry, history=history, valid=jnp.zeros_like(state.valid))

    def check_history(history, xs) -> None:
        """The stream's steps must have the shapes of the history the state holds."""
        steps = lambda t: avals(v.first_step(t))
        if steps(history) != steps(xs):
            shapes = lambda t: jax.tree.map(lambda a: a.shape[1:], t)
            raise ValueError(f"online_tbptt.update: xs has steps of shapes {shapes(xs)} but the state's input history "
                             f"was sized for steps of {shapes(history)}. A stream keeps its batch from one update to "
                             "the next: start a stream with another batch with reset(state, carry, xs).")

    def chunk_update(state: OnlineState, chunk):
        xs, targets = chunk
        window_xs = jax.tree.map(lambda h, x: jnp.concatenate([h, x]), state.history, xs)
        valid = jnp.concatenate([state.valid, jnp.ones((k1,), bool)])  # one flag per step, for all rows

        def window_loss(params):
            final, (ys, carries) = _unroll(recording_step, params, state.carry, (window_xs, valid),
                                           clip_norm=clip_norm, unroll=unroll)
            own = jax.tree.map(lambda y: y[span:], ys)
            loss = jnp.sum(jax.vmap(loss_fn)(own, targets)) if loss_fn is not None else 0.0
            if final_loss is not None:
                loss = loss + final_loss(final)
            return loss, (jax.tree.map(lambda c: c[k1 - 1], carries), own)

        (loss, (next_start, own)), grads = jax.value_and_grad(window_loss, has_aux=True)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        history = jax.tree.map(lambda w: w[k1:], window_xs)
        state = OnlineState(params, opt_state, jax.lax.stop_gradient(next_start), history, valid[k1:], state.chunks + 1)
        return state, (loss / k1, own if return_outputs else None)

    def update(state: OnlineState, xs: PyTree, targets: Optional[PyTree] = None) -> tuple:
        xs = _layout.time_major(xs, time_axis)
        targets = None if targets is None else _layout.time_major(targets, time_axis, "targets")
        length = v.time_length("xs", xs)
        if length % k1:
            raise ValueError(f"online_tbptt.update needs a number of steps that is a multiple of k1={k1}; xs has {length}.")
        if state.history is None:
            state = state._replace(history=empty_history(_layout.from_time_major(xs, time_axis)))
        check_history(state.history, xs)
        check_stream_shapes("online_tbptt.update", step, state.params, state.carry, xs)
        check_stream(step, spec, state.params, state.carry, xs, targets)
        chunked = jax.tree.map(lambda a: a.reshape((length // k1, k1) + a.shape[1:]), (xs, targets))
        state, (losses, ys) = lax.scan(chunk_update, state, chunked)
        if not return_outputs:
            return state, losses
        ys = jax.tree.map(lambda a: a.reshape((length,) + a.shape[2:]), ys)
        return state, losses, _layout.from_time_major(ys, time_axis)

    return OnlineTBPTT(init, update, reset)

