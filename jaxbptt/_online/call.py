"""What `online_grad`, `online` and `online_tbptt` share about a call: its losses (a per-step
`loss_fn(y_t, target_t)`, a `final_loss(final_carry)`, or both, as in `value_and_grad`), its
trace-time checks (those of `value_and_grad`'s call), and a stream that must keep its batch."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .. import _validate as v
from .._core import call as calls


def losses(loss_fn, final_loss) -> calls.Loss:
    """The call's losses, checked as `value_and_grad` checks them (not both None)."""
    if final_loss is not None:
        v.check_callable("final_loss", final_loss)
    return calls.make_loss(loss_fn, False, final_loss)


def check_optimizer(name: str, optimizer) -> None:
    if not (callable(getattr(optimizer, "init", None)) and callable(getattr(optimizer, "update", None))):
        raise TypeError(f"{name} needs optimizer an optax.GradientTransformation (with init and update), "
                        f"such as optax.sgd(1e-3); got optimizer={optimizer!r}.")


def check_stream(step, loss: calls.Loss, params, carry, xs, targets):
    """`value_and_grad`'s trace-time checks of a call (time axes, targets None only without a
    per-step loss, the carry, float params, scalar losses); returns the `Call`: its length, carry
    as arrays and loss dtype (one step's loss and the final loss together)."""
    return calls.prepare(step, params, carry, xs, targets, loss=loss)


def per_step(loss_fn, loss_type):
    """`loss_fn` in `loss_type`, or a zero loss when there is none."""
    if loss_fn is None:
        return lambda y, target: jnp.zeros((), loss_type)
    return lambda y, target: loss_fn(y, target).astype(loss_type)


def final_value(final_loss, carry, loss_type):
    """`final_loss(carry)` in `loss_type`, or zero."""
    return jnp.zeros((), loss_type) if final_loss is None else final_loss(carry).astype(loss_type)


def avals(tree):
    """`tree`'s structure with each leaf's shape and dtype: equal for trees a scan may carry alike."""
    return jax.tree.structure(tree), jax.tree.leaves(jax.tree.map(lambda a: (jnp.shape(a), jnp.result_type(a)), tree))


def check_stream_shapes(name: str, step, params, carry, xs) -> None:
    """The stream's steps must fit the state's carry: a stream keeps its batch between updates."""
    try:
        jax.eval_shape(step, params, carry, v.first_step(xs))
    except (TypeError, ValueError) as err:
        shapes = jax.tree.map(lambda c: tuple(jnp.shape(c)), carry)
        raise ValueError(
            f"{name}: step(params, state.carry, xs[0]) fails on this stream (error above). The state's carry has "
            f"shapes {shapes}; xs[0] has shapes {jax.tree.map(lambda s: s.shape, v.first_step(xs))}. A stream keeps "
            "its batch from one update to the next: to go on with another batch, start a new stream with "
            "reset(state, carry, xs) and a carry (and sample of xs) of the new batch."
        ) from err
