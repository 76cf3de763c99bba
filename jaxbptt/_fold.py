"""Proving that a step treats the leading axis of its carry and input as a batch of independent rows.

Parameter gradients of a block of steps are one VJP of the step applied to all the block's steps.
`jax.vmap` over time always gives that, but leaves (time, batch, ...) operands that XLA's CPU
backend contracts slowly. When the step is row-wise - every row of its outputs depends only on the
same row of its carry and input, by the same function - time can instead be folded into the
leading axis, `(K, B, ...) -> (K * B, ...)`, giving plain 2-D matrix products (about 1.8x faster
on CPU). Row-wise-ness cannot be assumed (a step may normalise over its batch), so it is proved:
`is_rowwise` walks the jaxpr of the step's JVP traced at the folded shape (the derivative is what
the fold changes, and a `custom_jvp` / `custom_vjp` rule may mix rows where its primal does not) and
tracks, for every value, the axis that carries the rows. Operations it does not know on row-carrying values make it answer
False, and the caller falls back to `vmap`, so an unknown step costs speed, never correctness.
"""

from __future__ import annotations

import enum
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

_ELEMENTWISE = frozenset(
    """abs acos acosh add and asin asinh atan atan2 atanh cbrt ceil clamp complex conj convert_element_type
    copy copy_p cos cosh digamma div eq erf erf_inv erfc exp exp2 expm1 floor ge gt imag integer_pow
    is_finite le lgamma log log1p logistic lt max min mul ne neg nextafter not or pow real
    reduce_precision rem round rsqrt select_n sign sin sinh sqrt square stop_gradient sub tan tanh
    xor add_any""".split()
)
_REDUCTIONS = frozenset("reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or argmax argmin".split())
_CUMULATIVE = frozenset("cumsum cumprod cummax cummin cumlogsumexp".split())
# The walked program is the step's JVP (see `_tangent_program`): there a `custom_jvp` rule is inlined,
# a `custom_vjp` rule is the opaque `custom_lin` (unsupported, so never folded), and a custom call left
# is a primal evaluation, whose value is its `call_jaxpr`.
_CALLS = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr", "custom_jvp_call": "call_jaxpr",
          "custom_vjp_call": "call_jaxpr", "custom_vjp_call_jaxpr": "fun_jaxpr", "remat": "jaxpr",
          "checkpoint": "jaxpr"}


class _NotRowwise(Exception):
    pass


class _Value(NamedTuple):
    """`axis`: where the rows are (None: the value does not depend on the rows). `const`: axes
    along which a row-independent value is constant (broadcast or size-1 axes)."""

    axis: Optional[int]
    const: frozenset = frozenset()


def _fail(why: str):
    raise _NotRowwise(why)


def _literal(v) -> _Value:
    return _Value(None, frozenset(range(len(getattr(v.aval, "shape", ())))))


def _unit_axes(aval) -> frozenset:
    return frozenset(i for i, d in enumerate(getattr(aval, "shape", ())) if d == 1)


def _elementwise(ins, in_avals) -> _Value:
    axes = {v.axis for v in ins if v.axis is not None}
    if len(axes) > 1:
        _fail("rows on different axes")
    (axis,) = axes
    for v, aval in zip(ins, in_avals):
        if v.axis is None and len(aval.shape) and axis not in (v.const | _unit_axes(aval)):
            _fail("a row-dependent value meets a value that varies along the row axis")
    return _Value(axis)


def _rule(eqn, ins: list[_Value]) -> list[_Value]:
    name = eqn.primitive.name
    params = eqn.params
    in_avals = [v.aval for v in eqn.invars]
    if name in _CALLS and _CALLS[name] in params:
        inner = params[_CALLS[name]]
        return _walk(getattr(inner, "jaxpr", inner), ins)
    if all(v.axis is None for v in ins):
        if name == "broadcast_in_dim":  # constant along every axis it adds
            kept = {d for i, d in enumerate(params["broadcast_dimensions"]) if i in ins[0].const}
            new = set(range(len(params["shape"]))) - set(params["broadcast_dimensions"])
            return [_Value(None, frozenset(kept | new))]
        return [_Value(None) for _ in eqn.outvars]  # row-independent in, row-independent out
    if name in _ELEMENTWISE:
        return [_elementwise(ins, in_avals)]
    (v, *rest) = ins
    if name == "broadcast_in_dim":
        return [_Value(params["broadcast_dimensions"][v.axis])]
    if name == "dot_general":
        (lc, rc), (lb, rb) = params["dimension_numbers"]
        lhs, rhs = ins
        lhs_free = [d for d in range(len(in_avals[0].shape)) if d not in lc and d not in lb]
        rhs_free = [d for d in range(len(in_avals[1].shape)) if d not in rc and d not in rb]
        if lhs.axis is not None and rhs.axis is not None:
            if lhs.axis in lb and rhs.axis in rb and lb.index(lhs.axis) == rb.index(rhs.axis):
                return [_Value(lb.index(lhs.axis))]
            _fail("dot_general mixes rows")
        if lhs.axis is not None:
            if lhs.axis not in lhs_free:
                _fail("dot_general contracts the row axis")
            return [_Value(len(lb) + lhs_free.index(lhs.axis))]
        if rhs.axis not in rhs_free:
            _fail("dot_general contracts the row axis")
        return [_Value(len(lb) + len(lhs_free) + rhs_free.index(rhs.axis))]
    if name in _REDUCTIONS or name in _CUMULATIVE:
        axes = params["axes"] if "axes" in params else (params["axis"],)
        if v.axis in axes:
            _fail(f"{name} over the row axis")
        shift = sum(a < v.axis for a in axes) if name in _REDUCTIONS else 0
        return [_Value(v.axis - shift)]
    if name == "concatenate":
        if params["dimension"] == _elementwise(ins, in_avals).axis:
            _fail("concatenate along the row axis")
        return [_elementwise(ins, in_avals)]
    if name == "split":
        if params["axis"] == v.axis:
            _fail("split of the row axis")
        return [_Value(v.axis) for _ in eqn.outvars]
    if name == "transpose":
        return [_Value(tuple(params["permutation"]).index(v.axis))]
    if name in ("squeeze",):
        if v.axis in params["dimensions"]:
            _fail("squeeze of the row axis")
        return [_Value(v.axis - sum(d < v.axis for d in params["dimensions"]))]
    if name == "reshape":
        if v.axis == 0 and params["new_sizes"][0] == in_avals[0].shape[0] and not params.get("dimensions"):
            return [_Value(0)]
        _fail("reshape across the row axis")
    if name == "slice":
        stride = (params["strides"] or (1,) * len(in_avals[0].shape))[v.axis]
        if params["start_indices"][v.axis] == 0 and params["limit_indices"][v.axis] == in_avals[0].shape[v.axis] and stride == 1:
            return [_Value(v.axis)]
        _fail("slice of the row axis")
    if name == "dynamic_slice":
        if any(r.axis is not None for r in rest) or params["slice_sizes"][v.axis] != in_avals[0].shape[v.axis]:
            _fail("dynamic_slice of the row axis")
        return [_Value(v.axis)]
    if name == "pad":
        if tuple(params["padding_config"][v.axis]) != (0, 0, 0) or rest[0].axis is not None:
            _fail("pad of the row axis")
        return [_Value(v.axis)]
    if name == "rev":
        if v.axis in params["dimensions"]:
            _fail("rev of the row axis")
        return [_Value(v.axis)]
    _fail(f"unsupported primitive {name}")


def _walk(jaxpr, ins: list[_Value]) -> list[_Value]:
    env = {}

    def read(v):
        return _literal(v) if isinstance(v, jex_core.Literal) else env.get(v, _Value(None))

    for var, val in zip(jaxpr.invars, ins):
        env[var] = val
    for eqn in jaxpr.eqns:
        outs = _rule(eqn, [read(v) for v in eqn.invars])
        for var, val in zip(eqn.outvars, outs):
            env[var] = val
    return [read(v) for v in jaxpr.outvars]


def _is_float(a) -> bool:
    return jnp.issubdtype(jnp.result_type(a), jnp.inexact)


def _tangent_program(step, tree):
    """`step`'s JVP as one function of (params, carry, x, their float tangents).

    The parameter gradient is the transpose of this program's linear part, so it, not the primal
    step, is what must be row-wise: tracing the JVP inlines every `custom_jvp` rule (proved like any
    other code) and fails on `custom_vjp` (whose backward rule cannot be inspected)."""

    def program(*flat):
        primals, float_tangents = flat[: len(flat) // 2], flat[len(flat) // 2 :]
        tangents = tuple(t if _is_float(p) else np.zeros(np.shape(p), jax.dtypes.float0)
                    for p, t in zip(primals, float_tangents))
        outs, out_tangents = jax.jvp(lambda *a: jax.tree.leaves(step(*jax.tree.unflatten(tree, a))),
                                     primals, tangents)
        return list(outs) + [t for o, t in zip(outs, out_tangents) if _is_float(o)]

    return program


def _rowwise_jaxpr(step, params, carry, x):
    """The jaxpr of the step's JVP when it is row-wise along axis 0 of every carry and input leaf
    and of their tangents, else None."""
    leaves = jax.tree.leaves((carry, x))
    if not leaves or any(len(leaf.shape) == 0 for leaf in leaves) or len({leaf.shape[0] for leaf in leaves}) != 1:
        return None
    flat, tree = jax.tree.flatten((params, carry, x))
    program = _tangent_program(step, tree)
    rows = [_Value(None)] * len(jax.tree.leaves(params)) + [_Value(0)] * len(leaves)
    try:
        closed = jax.make_jaxpr(program)(*flat, *flat)
        outs = _walk(closed.jaxpr, rows + rows)
    except (_NotRowwise, TypeError, ValueError):  # not row-wise, or no trace (or no JVP) at this shape
        return None
    return closed.jaxpr if all(o.axis == 0 for o in outs) else None


def _plain(value) -> bool:
    if isinstance(value, tuple):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str, np.generic, np.dtype, enum.Enum))


def _same_program(a, b, rows_a: int, rows_b: int) -> bool:
    """Whether two jaxprs run the same operations, their shapes differing only in the row count.

    Guards against a step that branches in Python on its batch size: the folded program must be the
    per-step program with more rows, not another program."""
    if len(a.eqns) != len(b.eqns) or len(a.invars) != len(b.invars):
        return False
    for ea, eb in zip(a.eqns, b.eqns):
        if ea.primitive is not eb.primitive or ea.params.keys() != eb.params.keys():
            return False
        for va, vb in zip(ea.invars, eb.invars):
            if isinstance(va, jex_core.Literal) != isinstance(vb, jex_core.Literal):
                return False
            if isinstance(va, jex_core.Literal) and str(va.val) != str(vb.val):
                return False
        for key in ea.params:
            pa, pb = ea.params[key], eb.params[key]
            if hasattr(pa, "jaxpr") or isinstance(pa, jex_core.Jaxpr):
                if not _same_program(getattr(pa, "jaxpr", pa), getattr(pb, "jaxpr", pb), rows_a, rows_b):
                    return False
            elif not (_plain(pa) and _plain(pb)) or pa == pb:
                continue  # functions (custom JVP rules, thunks) are not compared
            elif not (
                isinstance(pa, tuple) and isinstance(pb, tuple) and len(pa) == len(pb)
                and all(x == y or (x, y) == (rows_a, rows_b) for x, y in zip(pa, pb))
            ):
                return False
    return True


def is_rowwise(step, params, carry, x, folded_carry, folded_x) -> bool:
    """Whether `step` applied to the folded (more-rows) `folded_carry, folded_x` is exactly the
    step applied to `carry, x`, row by row: both programs are row-wise along axis 0 of every carry
    and input leaf, and they are the same program up to the row count.

    All arguments but `step` and `params` may be `jax.ShapeDtypeStruct`s.
    """
    small = _rowwise_jaxpr(step, params, carry, x)
    large = _rowwise_jaxpr(step, params, folded_carry, folded_x)
    if small is None or large is None:
        return False
    rows = jax.tree.leaves((carry, x))[0].shape[0], jax.tree.leaves((folded_carry, folded_x))[0].shape[0]
    return _same_program(small, large, *rows)
