"""One call, resolved once: `prepare` checks the arguments, puts the data time-major and resolves the
options for the sequence's length into a `Call`; a method computes a `Result` from it (or
`zero_length` does, for T = 0); `finish` returns it in the caller's layout, whatever the method.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from .. import _validate as v
from .._engine.kernel import is_float
from .._engine.reverse import Diagnostics
from . import layout
from .options import Options, poison_invalid, resolve


class Loss(NamedTuple):
    """What is differentiated: `sum_t per_step(y_t, target_t) + final(final_carry)`."""

    per_step: Optional[Callable] = None  # the scalar per-step loss (aux split off); None: no per-step loss
    with_aux: Optional[Callable] = None  # the user's `(loss_t, aux_t)` loss when `has_aux`
    final: Optional[Callable] = None  # `final_loss(final_carry) -> scalar`, or None

    @property
    def has_aux(self) -> bool:
        return self.with_aux is not None


class Call(NamedTuple):
    """A call with time-major data and resolved options."""

    step: Callable
    params: Any
    carry: Any
    xs: Any
    targets: Any
    length: int
    opts: Options
    argnums: tuple = (0,)
    loss: Loss = Loss()
    loss_dtype: Any = jnp.float32

    @property
    def x(self):
        """Abstract values of one step's input."""
        return v.first_step(self.xs)


class Result(NamedTuple):
    """A method's answer, time-major: `grads` is `(dparams, dcarry, dxs)`, None where not asked."""

    loss: Any
    final: Any
    grads: tuple
    aux: Any = None
    diag: Optional[Diagnostics] = None


def make_loss(loss_fn, has_aux: bool, final_loss) -> Loss:
    if loss_fn is None:
        if has_aux:
            raise ValueError("has_aux=True needs a per-step loss_fn returning (loss_t, aux_t); got loss_fn=None.")
        if final_loss is None:
            raise ValueError("loss_fn=None needs a final_loss (a function of the final carry): with neither, "
                             "there is no loss to differentiate.")
        return Loss(final=final_loss)
    v.check_callable("loss_fn", loss_fn)
    per_step = layout.split_aux(loss_fn) if has_aux else loss_fn
    return Loss(per_step, loss_fn if has_aux else None, final_loss)


def _check_carry(step, params, carry, xs, time_axis: int):
    """`check_carry`, and a hint when time-major data looks batch-major."""
    try:
        return v.check_carry(step, params, carry, xs)
    except (TypeError, ValueError) as err:
        hint = _batch_major_hint(carry, xs, time_axis)
        if hint:
            raise type(err)(f"{err} {hint}") from err
        raise


def _batch_major_hint(carry, xs, time_axis: int) -> str:
    """When the data's first axis has the carry's batch size and its second axis does not, the data
    is most likely batch-major: say so."""
    if time_axis != 0:
        return ""
    rows = {np.shape(c)[0] for c in jax.tree.leaves(carry) if np.ndim(c)}
    leaves = jax.tree.leaves(xs)
    if len(rows) != 1 or not leaves or any(np.ndim(a) < 2 for a in leaves):
        return ""
    (batch,) = rows
    if all(np.shape(a)[0] == batch != np.shape(a)[1] for a in leaves):
        return (f"xs looks batch-major, shaped (batch={batch}, T, ...): pass time_axis=1 for (batch, T, ...) data "
                f"(time-major (T, batch, ...) is the default, as in lax.scan).")
    return ""


def _length(xs, length) -> int:
    """T: the leading axis of `xs`, or `length` where `xs` has no leaves (no per-step inputs)."""
    if length is not None and (isinstance(length, bool) or not isinstance(length, int) or length < 0):
        raise ValueError(f"length must be None or a non-negative int (the number of steps); got length={length!r}.")
    if not jax.tree.leaves(xs):
        if length is None:
            raise ValueError(f"xs={xs!r} has no arrays to take the number of steps from: pass length=T, as to "
                             f"lax.scan.")
        return length
    found = v.time_length("xs", xs)
    if length is not None and length != found:
        raise ValueError(f"length={length} disagrees with the leading (time) axis of xs, of length {found}.")
    return found


def prepare(step, params, carry, xs, targets=None, *, loss: Optional[Loss] = None, argnums=(0,), time_axis=0,
            truncation=None, clip_norm=None, clip_scope="batch", remat=None, diagnostics=False, unroll=1,
            check_finite=False, axis_name=None, length=None) -> Call:
    """The trace-time checks of a call and its resolution (see the module docstring)."""
    xs = layout.time_major(xs, time_axis)
    length = _length(xs, length)
    if loss is not None and loss.per_step is not None:
        if targets is None:
            raise ValueError("targets=None is only for a call with no per-step loss (loss_fn=None); this call's "
                             "loss_fn needs targets with the same leading (time) axis as xs.")
        targets = layout.time_major(targets, time_axis, "targets")
        v.check_same_length("targets", targets, length)
    carry = _check_carry(step, params, carry, xs, time_axis)
    if loss is not None:  # `unroll` differentiates float leaves only, whatever the caller asks
        for a in argnums:
            v.check_differentiable(("params", "carry", "xs")[a], (params, carry, xs)[a])
    dtype = jnp.float32
    if loss is not None:
        _, y = jax.eval_shape(step, params, carry, v.first_step(xs))
        if loss.per_step is not None:
            dtype = v.check_loss(loss.per_step, y, v.first_step(targets)).dtype
        if loss.final is not None:
            final_dtype = v.check_loss(loss.final, carry, call="final_loss(final_carry)", what="the final loss").dtype
            dtype = final_dtype if loss.per_step is None else jnp.promote_types(dtype, final_dtype)
    if clip_norm is not None and clip_scope == "example":
        layout.check_example_rows(carry)
    opts = resolve(length, truncation=truncation, clip_norm=clip_norm, remat=remat, clip_scope=clip_scope,
                   diagnostics=diagnostics, unroll=unroll, check_finite=check_finite, axis_name=axis_name,
                   need_xs=2 in argnums)
    return Call(step, params, carry, xs, targets, length, opts, tuple(argnums), loss or Loss(), dtype)


def zero_length(call: Call) -> Result:
    """The exact answer for T = 0: no per-step loss, the initial carry, the final loss's gradient."""
    zeros = jax.tree.map(jnp.zeros_like, (call.params, call.carry, call.xs))
    value = jnp.zeros((), call.loss_dtype)
    dcarry = zeros[1]
    if call.loss.final is not None:
        final_value, dcarry = jax.value_and_grad(call.loss.final)(call.carry)
        value = value + final_value
    aux = None
    if call.loss.has_aux:
        _, y = jax.eval_shape(call.step, call.params, call.carry, call.x)
        _, aux = jax.eval_shape(call.loss.with_aux, y, v.first_step(call.targets))
        aux = jax.tree.map(lambda s: jnp.zeros((0,) + s.shape, s.dtype), aux)
    diag = Diagnostics(jnp.zeros((0,), jnp.float32), jnp.zeros((0,), bool)) if call.opts.diagnostics else None
    return Result(value, call.carry, (zeros[0], dcarry, zeros[2]), aux, diag)


def _cast_like(tree, like):
    return jax.tree.map(lambda g, p: g.astype(jnp.result_type(p)) if is_float(p) and g.dtype != jax.dtypes.float0
                        else g, tree, like)


def finish(call: Call, result: Result, time_axis: int):
    """`((loss, final_carry[, aux][, diag]), grads)` in the caller's layout, `grads` by `argnums`."""
    dparams, dcarry, dxs = result.grads
    grads = {0: dparams, 1: dcarry, 2: dxs}
    grads = {a: _cast_like(grads[a], (call.params, call.carry, call.xs)[a]) for a in call.argnums}
    if 2 in grads:
        grads[2] = layout.from_time_major(grads[2], time_axis)
    grads = poison_invalid(tuple(grads[a] for a in call.argnums), call.opts)
    out = (result.loss, result.final)
    if call.loss.has_aux:
        out += (result.aux,)
    if call.opts.diagnostics:
        out += (result.diag,)
    return out, grads


def select(argnums, grads: tuple):
    """`grads` (one entry per argnum) as `jax.value_and_grad` returns them for `argnums`."""
    return grads[0] if isinstance(argnums, int) else grads
