"""The autodiff method: JAX's own reverse mode through the option surrogates' `lax.scan`.

`jax.value_and_grad` of the summed loss through `surrogates.surrogate_unroll`, optionally over
`jax.checkpoint(step)` (each step's carry and input stored, its residuals recomputed in the
backward pass). Its derivatives of every order are those of the gradient the options define.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .call import Call, Result
from .surrogates import surrogate_unroll


def value_and_grad(call: Call, checkpoint: bool) -> Result:
    loss, targets = call.loss, call.targets

    head = loss.with_aux if loss.has_aux else loss.per_step
    if head is None:  # no per-step loss: the outputs are dropped in the loop
        head = lambda y, t: jnp.zeros((), call.loss_dtype)

    def total(params, carry, xs):
        final, heads = surrogate_unroll(call.step, params, carry, xs, call.length, call.opts, checkpoint=checkpoint,
                                        head=head, targets=targets)
        losses, aux = heads if loss.has_aux else (heads, None)
        value = jnp.sum(losses)
        if loss.final is not None:
            value = value + loss.final(final)
        return value.astype(call.loss_dtype), (final, aux)

    (value, (final, aux)), grads = jax.value_and_grad(total, call.argnums, has_aux=True)(call.params, call.carry,
                                                                                        call.xs)
    by_argnum = dict(zip(call.argnums, grads))
    return Result(value, final, tuple(by_argnum.get(a) for a in range(3)), aux)


def unroll(call: Call, checkpoint: bool):
    """`(final_carry, ys)`, time-major, differentiable by JAX through the surrogates."""
    return surrogate_unroll(call.step, call.params, call.carry, call.xs, call.length, call.opts, checkpoint=checkpoint)
