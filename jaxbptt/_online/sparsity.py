"""Structural Jacobian patterns: a step re-evaluated so that the non-zeros of its Jacobian at one
generic point are the non-zeros it can have at any point.

SnAp's sparsity pattern and UORO's independent examples are read off Jacobians of the step at
generic points. A Jacobian entry can vanish at a point for a reason that depends on the data: a
ReLU unit inactive there (`max(z, 0)`), the branch `where` did not take, an embedding row that the
token ids of that point do not select (`gather`), a sort's permutation. `structural(fn)` evaluates
`fn`'s jaxpr equation by equation and replaces each such equation, where its inputs depend on the
arguments, by a surrogate of the same shapes whose derivative reaches every input the original's
derivative can reach at some point:

  - `max`, `min`, `clamp`: the sum of the operands;
  - `select_n` (`where`) with a data-dependent predicate: the sum of the cases;
  - `reduce_max`/`reduce_min`, `cummax`/`cummin`, `reduce_window_max`/`_min`: the matching sums;
  - `gather`, `dynamic_slice` with data-dependent indices: the same lookup in an operand summed
    (and broadcast back) over the indexed axes; `dynamic_update_slice` and the scatters with
    data-dependent indices: the operand plus the sum of the update;
  - `sort`: each float operand summed along the sorted axis;
  - a float made from a data-dependent bool or int (`(z > 0) * g`, a one-hot): ones;
  - `cond` with a data-dependent index: the sum of its branches;
  - a `custom_vjp` function: its primal plus the sum of all its inputs (its backward rule is
    opaque, so every output may depend on every input); a `custom_jvp` function: its primal
    (the rules JAX ships -- `relu`, `logsumexp`, `softplus` -- have their primal's structure).

Everything else is evaluated as it is; `jit`, `checkpoint` and `scan` bodies are walked the same
way. A `while_loop` whose inputs depend on the arguments is refused: its trip count, and with it
the structure, may depend on the data.
"""

from __future__ import annotations

import jax
import jax.extend as jex
import jax.numpy as jnp
from jax import lax


def structural(fn):
    """`fn` evaluated with the surrogates above: the same shapes and dtypes, and a Jacobian whose
    non-zeros at a generic point include those of `fn`'s Jacobian at every point."""

    def run(*args):
        closed, shapes = jax.make_jaxpr(fn, return_shape=True)(*args)
        leaves = jax.tree.leaves(args)
        outs = _eval(closed.jaxpr, closed.consts, leaves, [True] * len(leaves))
        return jax.tree.unflatten(jax.tree.structure(shapes), [value for value, _ in outs])

    return run


def _is_float(x) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def _eval(jaxpr, consts, args, deps):
    """Evaluate `jaxpr`; `deps[i]` says whether argument i depends on the function's arguments.
    Returns (value, depends) per output."""
    env = {}

    def read(v):
        return (v.val, False) if isinstance(v, jex.core.Literal) else env[v]

    for v, c in zip(jaxpr.constvars, consts):
        env[v] = (c, False)
    for v, a, d in zip(jaxpr.invars, args, deps):
        env[v] = (a, d)
    for eqn in jaxpr.eqns:
        read_in = [read(v) for v in eqn.invars]
        vals, in_deps = [value for value, _ in read_in], [d for _, d in read_in]
        outs = _dependent(eqn, vals, in_deps) if any(in_deps) else _exact(eqn, vals)
        for v, out in zip(eqn.outvars, outs):
            env[v] = (out, any(in_deps))
    return [read(v) for v in jaxpr.outvars]


def _values(outs):
    return [value for value, _ in outs]


def _like(eqn, outs):
    """Surrogate outputs in the equation's own dtypes (a sum of a weak literal may widen)."""
    return [lax.convert_element_type(o, v.aval.dtype) for o, v in zip(outs, eqn.outvars)]


def _summed_over(x, axes):
    """`x` summed over `axes` and broadcast back: every position along them reads all of them."""
    if not axes:
        return x
    return jnp.broadcast_to(jnp.sum(x, axis=tuple(axes), keepdims=True), jnp.shape(x))


def _total(vals, deps):
    """The sum of every element of the data-dependent float inputs, a scalar."""
    parts = [jnp.sum(v) for v, d in zip(vals, deps) if d and _is_float(v)]
    return sum(parts) if parts else 0.0


def _exact(eqn, vals):
    """The equation as it is (as `jax.core.eval_jaxpr` binds it)."""
    params = eqn.primitive.get_bind_params(eqn.params)
    if isinstance(params, tuple):  # JAX before 0.7: (subfuns, params)
        subfuns, params = params
        vals = [*subfuns, *vals]
    outs = eqn.primitive.bind(*vals, **params)
    return outs if eqn.primitive.multiple_results else [outs]


def _dependent(eqn, vals, deps):
    name, p = eqn.primitive.name, eqn.params
    if name in ("jit", "pjit", "closed_call", "core_call", "custom_jvp_call"):
        closed = p["jaxpr"] if "jaxpr" in p else p["call_jaxpr"]
        return _values(_eval(closed.jaxpr, closed.consts, vals, deps))
    if name in ("remat2", "checkpoint"):
        return _values(_eval(p["jaxpr"], (), vals, deps))
    if name == "custom_vjp_call":
        closed = p["call_jaxpr"]
        outs = _values(_eval(closed.jaxpr, closed.consts, vals, deps))
        total = _total(vals, deps)
        return _like(eqn, [o + 0.5 * total if _is_float(o) else o for o in outs])
    if name == "cond":
        branches = [_values(_eval(b.jaxpr, b.consts, vals[1:], deps[1:])) for b in p["branches"]]
        if not deps[0]:
            return lax.switch(vals[0], [lambda outs=outs: outs for outs in branches])
        return _like(eqn, [sum(outs) if _is_float(outs[0]) else outs[0] for outs in zip(*branches)])
    if name == "scan":
        return _scan(eqn, vals, deps)
    if name == "while":
        raise ValueError("the step's structure (which entries of its Jacobians can be non-zero) is read from its "
                         "operations, and the step runs a while_loop whose trip count may depend on the data. Use "
                         "jb.RTRL() or jb.UORO(), or write the loop with lax.scan or lax.fori_loop with static bounds.")
    rule = _RULES.get(name)
    return _exact(eqn, vals) if rule is None else rule(eqn, vals, deps)


def _scan(eqn, vals, deps):
    p = eqn.params
    closed, n_consts, n_carry = p["jaxpr"], p["num_consts"], p["num_carry"]
    consts, init, xs = vals[:n_consts], vals[n_consts:n_consts + n_carry], vals[n_consts + n_carry:]
    # a carry that starts constant may become data-dependent after one iteration: take it as dependent
    body_deps = list(deps[:n_consts]) + [True] * n_carry + list(deps[n_consts + n_carry:])

    def body(carry, x):
        outs = _values(_eval(closed.jaxpr, closed.consts, [*consts, *carry, *x], body_deps))
        carry_avals = [v.aval for v in closed.jaxpr.outvars[:n_carry]]
        return [lax.convert_element_type(o, a.dtype) for o, a in zip(outs[:n_carry], carry_avals)], outs[n_carry:]

    carry, ys = lax.scan(body, list(init), list(xs), length=p["length"], reverse=p["reverse"], unroll=p["unroll"])
    return [*carry, *ys]


def _operand_sum(eqn, vals, deps):
    """max, min, clamp: the sum of the operands."""
    return _like(eqn, [sum(jnp.asarray(v) for v in vals)])


def _select(eqn, vals, deps):
    if not deps[0] or not _is_float(vals[1]):
        return _exact(eqn, vals)
    return _like(eqn, [sum(vals[1:])])


def _reduce(eqn, vals, deps):
    return _like(eqn, [jnp.sum(vals[0], axis=tuple(eqn.params["axes"]))])


def _cumulative(eqn, vals, deps):
    return _like(eqn, [lax.cumsum(vals[0], axis=eqn.params["axis"], reverse=eqn.params["reverse"])])


def _window(eqn, vals, deps):
    return [lax.reduce_window_sum_p.bind(vals[0], **eqn.params)]


def _gather(eqn, vals, deps):
    if not deps[1]:
        return _exact(eqn, vals)
    operand = _summed_over(vals[0], eqn.params["dimension_numbers"].start_index_map)
    return _exact(eqn, [operand, vals[1]])


def _dynamic_slice(eqn, vals, deps):
    axes = [axis for axis, d in enumerate(deps[1:]) if d]
    return _exact(eqn, [_summed_over(vals[0], axes), *vals[1:]])


def _dynamic_update_slice(eqn, vals, deps):
    if not any(deps[2:]) or not _is_float(vals[0]):
        return _exact(eqn, vals)
    return _like(eqn, [vals[0] + jnp.sum(vals[1])])


def _scatter(eqn, vals, deps):
    """Data-dependent positions, or a min / max whose winner depends on the data: the operand plus
    the sum of the updates."""
    if (not deps[1] and eqn.primitive.name not in ("scatter-min", "scatter-max")) or not _is_float(vals[0]):
        return _exact(eqn, vals)
    return _like(eqn, [vals[0] + jnp.sum(vals[2])])


def _sort(eqn, vals, deps):
    outs = _exact(eqn, vals)
    axis = eqn.params["dimension"]
    return [_summed_over(v, (axis,)) if _is_float(v) else o for v, o in zip(vals, outs)]


def _convert(eqn, vals, deps):
    if _is_float(vals[0]) or not jnp.issubdtype(eqn.params["new_dtype"], jnp.inexact):
        return _exact(eqn, vals)
    # a mask or one-hot made from the data: a value of 0 there would hide what it multiplies
    return [jnp.ones(jnp.shape(vals[0]), eqn.params["new_dtype"])]


_RULES = {
    "max": _operand_sum,
    "min": _operand_sum,
    "clamp": _operand_sum,
    "select_n": _select,
    "reduce_max": _reduce,
    "reduce_min": _reduce,
    "cummax": _cumulative,
    "cummin": _cumulative,
    "reduce_window_max": _window,
    "reduce_window_min": _window,
    "gather": _gather,
    "dynamic_slice": _dynamic_slice,
    "dynamic_update_slice": _dynamic_update_slice,
    "scatter": _scatter,
    "scatter-add": _scatter,
    "scatter-mul": _scatter,
    "scatter-min": _scatter,
    "scatter-max": _scatter,
    "sort": _sort,
    "convert_element_type": _convert,
}
