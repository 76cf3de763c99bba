"""The reverse-scan method: a resolved call run on the engine (`jaxbptt._engine`).

`value_and_grad` has no custom VJP: it runs the engine's forward and reverse passes as ordinary
JAX code, so `jax.grad` of it (meta-gradients, Hessians) differentiates them like any other code.
`unroll` is a `jax.custom_vjp` whose backward pass is the engine's reverse scan.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .. import _validate as v
from .._engine import reverse
from .._engine.kernel import Step, as_engine_cotangent, is_float
from .._engine.remat import Plan, make_plan
from .call import Call, Result, _cast_like
from .options import poison_invalid


def plan_of(call: Call, store=None) -> Plan:
    """The engine's block plan for the call's memory policy (`store`: see `make_plan`)."""
    return make_plan(call.length, call.opts.remat, reverse.rows_per_step(call.carry),
                     reverse.carry_elements(call.carry), store=store)


def _stacked_loss(loss_fn, ys, targets):
    """`(sum_t loss_t, aux stacked over time)` of a `has_aux` loss."""
    losses, aux = jax.vmap(loss_fn)(ys, targets)
    return jnp.sum(losses), aux


def value_and_grad(call: Call, plan: Plan) -> Result:
    """The call's loss and gradients from one forward and one reverse scan."""
    step, params, carry, xs, opts, loss = call.step, call.params, call.carry, call.xs, call.opts, call.loss
    kernel, consts = reverse.setup(step, params, carry, xs)
    ct_ys, per_step, aux = None, (loss.per_step, call.targets), None
    if loss.has_aux:  # the stacked aux needs every step's output at once
        final, ys, saved = reverse.forward(kernel, params, consts, carry, xs, plan, opts)
        value, loss_vjp, aux = jax.vjp(lambda ys: _stacked_loss(loss.with_aux, ys, call.targets), ys, has_aux=True)
        (ct_ys,), per_step = loss_vjp(jnp.ones_like(value)), None
    else:
        final, value, saved = reverse.forward(kernel, params, consts, carry, xs, plan, opts, loss=per_step)
    if loss.final is not None:
        final_value, ct_final = jax.value_and_grad(loss.final)(final)
        value = value + final_value
        ct_final = as_engine_cotangent(ct_final, carry)
    else:
        ct_final = jax.tree.map(lambda c: jnp.zeros(c.shape, c.dtype if is_float(c) else jnp.float32), carry)
    dparams, dcarry, dxs, diag = reverse.backward(kernel, params, consts, xs, saved, plan, opts, ct_final=ct_final,
                                                  ct_ys=ct_ys, loss=per_step)
    return Result(value.astype(call.loss_dtype), final, (dparams, dcarry, dxs), aux, diag)


def hoist_closure(step, params, carry, x):
    """`(step, params)`, with the values `step` closes over that may carry a derivative moved into
    its parameters as `(params, hoisted)`, or unchanged when there are none.

    A custom VJP cannot differentiate with respect to values its function closes over, where
    `lax.scan` can (a hyperparameter, `resettable`'s initial carry, meta-learning); as explicit
    parameters they get their gradients from the engine like any other parameter. Under `jit`
    alone it cannot be known whether they will be differentiated, so traced values are always
    hoisted. A kernel-backed `Step` that declares its closure (`Step.closure`) is run as its
    `opened` step, which keeps the kernel; any other closed-over traced value is hoisted with
    `jax.closure_convert`, and the step then takes the generic kernel.
    """
    if isinstance(step, Step) and step.closure is not None and any(
        v.is_traced(a) for a in jax.tree.leaves(step.closure)
    ):
        step, params = step.opened, (params, step.closure)
    fn, hoisted = jax.closure_convert(lambda p, c, x_: step(p, c, x_), params, carry, x)
    if not hoisted:
        return step, params
    return (lambda ph, c, x_: fn(ph[0], c, x_, *ph[1])), (params, list(hoisted))


def _differentiable_unroll(step, plan: Plan):
    @jax.custom_vjp
    def run(params, carry, xs, opts, probe):
        del probe
        return run_fwd(params, carry, xs, opts, None)[0]

    def run_fwd(params, carry, xs, opts, probe):
        kernel, consts = reverse.setup(step, params, carry, xs)
        final, ys, saved = reverse.forward(kernel, params, consts, carry, xs, plan, opts)
        return (final, ys), (params, carry, xs, consts, saved, opts, probe)

    def run_bwd(residuals, cotangents):
        params, carry, xs, consts, saved, opts, probe = residuals
        ct_final, ct_ys = cotangents
        kernel, _ = reverse.setup(step, params, carry, xs)
        dparams, dcarry, dxs, diag = reverse.backward(
            kernel, params, consts, xs, saved, plan, opts, ct_final=as_engine_cotangent(ct_final, carry), ct_ys=ct_ys
        )
        dcarry = jax.tree.map(
            lambda g, c: g.astype(c.dtype) if is_float(c) else np.zeros(c.shape, jax.dtypes.float0), dcarry, carry
        )
        grads = poison_invalid((_cast_like(dparams, params), dcarry, dxs), opts)
        if probe is not None:
            diag = jax.tree.map(lambda d, p: d.astype(p.dtype), diag, probe)
        return grads + (None, diag)  # the options get no gradient, as through the surrogate

    run.defvjp(run_fwd, run_bwd)
    return run


def unroll(call: Call, plan: Plan, probe=None):
    """`(final_carry, ys)`, time-major, differentiable through the reverse scan."""
    step, params = hoist_closure(call.step, call.params, call.carry, jax.tree.map(lambda a: a[0], call.xs))
    return _differentiable_unroll(step, plan)(params, call.carry, call.xs, call.opts, probe)
