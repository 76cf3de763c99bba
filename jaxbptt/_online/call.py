"""The losses of an online call and its trace-time checks, shared by `online_grad`, `online` and
`online_tbptt`: per-step losses `loss_fn(y_t, target_t)` (optional), a final loss
`final_loss(final_carry)` (optional, at least one of the two), targets optional with no per-step
loss (or a loss that reads none), a step that may return `y = None`."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .. import _validate as v


def check_losses(loss_fn, final_loss) -> None:
    """Each loss None or callable, not both None."""
    if loss_fn is not None:
        v.check_callable("loss_fn", loss_fn)
    if final_loss is not None:
        v.check_callable("final_loss", final_loss)
    if loss_fn is None and final_loss is None:
        raise ValueError("loss_fn=None and final_loss=None leave nothing to differentiate: pass loss_fn(y_t, target_t) "
                         "(a loss per step), final_loss(final_carry) (a loss of the final carry), or both.")


def check_optimizer(name: str, optimizer) -> None:
    if not (callable(getattr(optimizer, "init", None)) and callable(getattr(optimizer, "update", None))):
        raise TypeError(f"{name} needs optimizer an optax.GradientTransformation (with init and update), "
                        f"such as optax.sgd(1e-3); got optimizer={optimizer!r}.")


def _check_final_loss(final_loss, carry) -> jnp.dtype:
    out = jax.eval_shape(final_loss, carry)
    if not hasattr(out, "shape") or out.shape != () or not jnp.issubdtype(out.dtype, jnp.floating):
        raise ValueError("final_loss(final_carry) must return a float scalar (the loss of the final carry); got "
                         f"{jax.tree.map(lambda s: f'{jnp.dtype(s.dtype).name}{list(s.shape)}', out)}.")
    return out.dtype


def step_targets(targets, length: int):
    """`targets`, checked against the length of `xs` (None stays None: each step's target is None)."""
    if targets is not None:
        v.check_same_length("targets", targets, length)
    return targets


def check_stream(step, loss_fn, final_loss, params, carry, xs, targets):
    """The trace-time checks of an online call; returns `(T, carry as arrays, loss dtype)`, the
    loss dtype that of one step's loss and the final loss together (the summed loss keeps it)."""
    length = v.time_length("xs", xs)
    step_targets(targets, length)
    carry = v.check_carry(step, params, carry, xs)
    v.check_differentiable("params", params)
    dtypes = []
    if loss_fn is not None:
        _, y = jax.eval_shape(step, params, carry, v.first_step(xs))
        target = None if targets is None else v.first_step(targets)
        v.check_loss(loss_fn, y, target)
        dtypes.append(jax.eval_shape(loss_fn, y, target).dtype)
    if final_loss is not None:
        dtypes.append(_check_final_loss(final_loss, carry))
    return length, carry, jnp.result_type(*dtypes)


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
            f"{name}: step(params, state.carry, xs[0]) fails on this stream (error above). The state's carry has shapes "
            f"{shapes}; xs[0] has shapes {jax.tree.map(lambda s: s.shape, v.first_step(xs))}. A stream keeps its batch "
            "from one update to the next: to go on with another batch, start a new stream with "
            "reset(state, carry, xs) and a carry (and sample of xs) of the new batch."
        ) from err
