"""How the engine runs one step: the kernel protocol, and the generic kernel for any step.

The engine (`_reverse.py`) never differentiates a whole scan. It asks a `Kernel` for five pieces:

    us      = project(params, xs_block)                # carry-independent input work, all steps at once
    carry, out, res = forward(params, consts, carry, u) # one step; `out` and `res` are kept per step
    ys      = post(params, outs_block)                 # carry-independent output work, all steps at once
    ct_carry_prev, local = backward(params, consts, out, prev_out, res, ct_carry, ct_out)  # carry only
    dparams, dus = grads(params, consts, carry_start, us_block, outs_block, prev_outs_block, res_block,
                         locals_block)

`prev_out` is the previous step's `out`, which the engine reads from the block's stored outputs
(and, for the block's first step, from its starting carry with `previous_out(carry)`); kernels whose
`out` is not part of the carry set `previous_out=None` and receive None. `backward` is the only
piece inside the sequential reverse loop and touches nothing but the carry adjoint; it must be
linear in `(ct_carry, ct_out)`, and so must `local`, the per-step value from which `grads` forms
parameter and input gradients for a whole block of steps at once (large matrix products instead of
one small accumulation per step). `consts = prepare(params, carry, u)` holds
loop-invariant values, computed once outside every loop. An invertible step's kernel also has
`inverse(params, consts, carry_next, u)`, which `remat=Invert()` runs backwards to rebuild carries.

Built-in cells supply hand-derived kernels (see `_cells.py`). Any other step gets `generic_kernel`,
built on the step's split at its parameter uses (`_split.py`): `forward` keeps only the time-varying
residuals of the step's VJP with respect to the carry, the input and a zero perturbation of every
site (parameter use); what depends on the parameters alone, such as the weight matrices, is found by
a dependency walk over the jaxpr and kept once in `consts`, and residuals that are leaves of the new
carry are read from the stored carry. `backward` emits each site's output cotangent as `local`, and
`grads` turns a block's cotangents into parameter gradients with one VJP per site mapped over the
block's steps (a matrix product over time and batch for `h @ W`), never re-running the step's
backward pass.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from .._engine.split import evaluate, needed_equations, split_step
from .._types import PyTree


class Kernel(NamedTuple):
    """The engine's view of a step (see the module docstring for each piece's contract)."""

    prepare: Callable[..., PyTree]
    project: Callable[..., PyTree]
    forward: Callable[..., tuple[PyTree, PyTree, PyTree]]
    backward: Callable[..., tuple[PyTree, PyTree]]
    grads: Callable[..., tuple[PyTree, PyTree]]
    post: Callable[..., PyTree]
    previous_out: Optional[Callable[[PyTree], PyTree]] = None
    # inverse(params, consts, carry_next, u) -> (carry, kept): the carry entering the step whose
    # projected input is u, and `kept`, the step's `(out, res)` as `forward` gives them (or None, and
    # the engine recomputes them); None for a step without an inverse (see `remat=Invert()`).
    inverse: Optional[Callable[..., tuple[PyTree, Optional[tuple[PyTree, PyTree]]]]] = None


class Step:
    """A step function that also knows how to build its `Kernel` for the engine.

    Calling it is calling the plain step, so it works everywhere a step function does; the engine
    calls `make_kernel(params, carry, u)` instead of deriving a generic kernel. Wrapping it in
    another function drops this and falls back to the generic (still exact) path.

    A step that closes over arrays a derivative may be taken with respect to (`resettable`'s initial
    carry) declares them: `closure` is that pytree of values and `opened` the same step with them
    as explicit parameters, `opened((params, closure), carry, x) == step(params, carry, x)`, whose
    kernel returns their gradients too. When they are traced, the engine runs `opened` with
    `(params, closure)` (see `_unroll.hoist_closure`), so that a custom VJP never closes over them.
    """

    def __init__(self, fn: Callable, make_kernel: Callable[..., Kernel], *, same_batch: bool = False,
                 closure: PyTree = None, opened: Optional["Step"] = None):
        functools.update_wrapper(self, fn, updated=())
        self._fn = fn
        self.make_kernel = make_kernel
        # The kernel assumes every input and carry leaf has the same batch shape (the built-in cells);
        # other inputs (an input broadcast against a batched carry, say) take the generic kernel.
        self.same_batch = same_batch
        self.closure = closure
        self.opened = opened

    def __call__(self, params, carry, x):
        return self._fn(params, carry, x)

    def __repr__(self) -> str:
        return f"jaxbptt.Step({self.__name__})"


def reparametrized(step: Step, split: Callable[[PyTree], PyTree]) -> Step:
    """`step` taking its parameters in another layout: `split(params)` are `step`'s parameters.

    `split` only rearranges (or binds constants into) the parameter pytree, so the kernel's
    parameter gradients are mapped back by its VJP, exactly.
    """

    def fn(params, carry, x):
        return step(split(params), carry, x)

    def make_kernel(params, carry, u):
        return _reparametrized_kernel(kernel_for(step, split(params), carry, u), split)

    return Step(fn, make_kernel, same_batch=step.same_batch)


def closed(fn: Callable, opened: Step, closure: PyTree) -> Step:
    """The Step `fn`, equal to `opened((params, closure), carry, x)`, declaring `closure`."""
    bound = reparametrized(opened, lambda params: (params, closure))
    return Step(fn, bound.make_kernel, same_batch=opened.same_batch, closure=closure, opened=opened)


def _reparametrized_kernel(inner: Kernel, split) -> Kernel:
    def grads(params, consts, carry_start, us, outs, prev_outs, res, locals_):
        inner_params, pullback = jax.vjp(split, params)
        dinner, dus = inner.grads(inner_params, consts, carry_start, us, outs, prev_outs, res, locals_)
        dinner = jax.tree.map(lambda d, p: d.astype(jnp.result_type(p)) if is_float(p) else d, dinner, inner_params)
        (dparams,) = pullback(as_jax_cotangent(dinner, inner_params))
        return dparams, dus

    return Kernel(
        prepare=lambda params, carry, u: inner.prepare(split(params), carry, u),
        project=lambda params, xs: inner.project(split(params), xs),
        forward=lambda params, consts, carry, u: inner.forward(split(params), consts, carry, u),
        backward=lambda params, *rest: inner.backward(split(params), *rest),
        grads=grads,
        post=lambda params, outs: inner.post(split(params), outs),
        previous_out=inner.previous_out,
    )


def kernel_for(step: Callable, params: PyTree, carry: PyTree, x: PyTree) -> Kernel:
    """The hand-derived kernel of a built-in step, else the generic kernel of `step`; with the step's
    declared inverse (`jaxbptt.invertible`) when the kernel has none of its own."""
    if isinstance(step, Step) and (
        not step.same_batch or len({np.shape(a)[:-1] for a in jax.tree.leaves((carry, x))}) == 1
    ):
        kernel = step.make_kernel(params, carry, x)
    else:
        kernel = generic_kernel(step, params, carry, x)
    inverse = getattr(step, "inverse", None)
    if kernel.inverse is not None or inverse is None:
        return kernel
    if kernel.project is not identity_project:  # the declared inverse takes x, which u no longer is
        kernel = generic_kernel(step, params, carry, x)
    return kernel._replace(inverse=lambda p, consts, c, u: (inverse(p, c, u), None))


def identity_project(params, xs):
    del params
    return xs


def identity_post(params, outs):
    del params
    return outs


def varying_outputs(closed_jaxpr, varying_inputs: list[bool]) -> list[bool]:
    """Which outputs of a jaxpr depend on the inputs flagged as varying (a forward walk).

    Conservative: an equation with any varying input makes all its outputs varying, nested jaxprs
    included, so a misclassification can only cost memory, never correctness.
    """
    jaxpr = closed_jaxpr.jaxpr
    varying = {v for v, flag in zip(jaxpr.invars, varying_inputs) if flag}

    def is_varying(v) -> bool:
        return not isinstance(v, jex_core.Literal) and v in varying

    for eqn in jaxpr.eqns:
        if any(is_varying(v) for v in eqn.invars):
            varying.update(eqn.outvars)
    return [is_varying(v) for v in jaxpr.outvars]


def generic_kernel(step: Callable, params: PyTree, carry: PyTree, u: PyTree) -> Kernel:
    """A `Kernel` for any step, derived with `jax.vjp` from its split (see the module docstring).

    `carry` and `u` are one step's carry and input (arrays or `jax.ShapeDtypeStruct`s); they fix
    the residual layout, found once by tracing the step.
    """
    user_step = step
    step = lambda p, c, x: tuple(user_step(p, c, x))  # as in lax.scan, a list [carry, y] is a pair
    split = split_step(step, params, carry, u)
    p_tree, c_tree, x_tree = (jax.tree.structure(t) for t in (params, carry, u))
    y_tree = jax.tree.structure(jax.eval_shape(step, params, carry, u)[1])
    n_c = c_tree.num_leaves
    # Where the output is a function of the new carry alone (a readout), the loop's `out` is the new
    # carry and `post` computes the outputs of a whole block at once.
    as_post = split.output_from_carry

    def run(hoisted, c, x, zs):
        flat = split.per_step(hoisted, jax.tree.leaves(c), jax.tree.leaves(x), zs)
        return c_tree.unflatten(flat[:n_c]), (None if as_post else y_tree.unflatten(flat[n_c:]))

    def post(p, outs):
        if not as_post:
            return outs
        hoisted = split.hoist(jax.tree.leaves(p))
        return jax.vmap(lambda c: y_tree.unflatten(split.outputs(hoisted, jax.tree.leaves(c))))(outs)

    def new_carry_of(out, res):
        return out if as_post else res[1]

    x_float = [is_float(leaf) for leaf in jax.tree.leaves(u)]

    def vjp_of_run(hoisted, c, x):
        """`run`'s VJP with respect to the carry, the input's float leaves and the perturbations."""
        leaves = jax.tree.leaves(x)

        def f(c_, x_floats, zs):
            it = iter(x_floats)
            return run(hoisted, c_, x_tree.unflatten([next(it) if fl else a for a, fl in zip(leaves, x_float)]), zs)

        return jax.vjp(f, c, [a for a, fl in zip(leaves, x_float) if fl], split.zero_perturbations())

    structure: dict[str, Any] = {}

    def residual_leaves(hoisted, c, x):
        (new_c, _), vjp_fn = vjp_of_run(hoisted, c, x)
        leaves, structure["treedef"] = jax.tree.flatten(vjp_fn)
        return leaves, jax.tree.leaves(new_c)

    hoisted_spec = jax.eval_shape(split.hoist, jax.tree.leaves(params))
    closed = jax.make_jaxpr(residual_leaves)(hoisted_spec, carry, u)
    treedef = structure["treedef"]
    n_res = treedef.num_leaves
    n_rest = len(jax.tree.leaves(carry)) + len(jax.tree.leaves(u))
    varying = varying_outputs(closed, [False] * len(hoisted_spec) + [True] * n_rest)[:n_res]
    # A residual that is a leaf of the new carry is read from the stored carry; one that cheap
    # elementwise work derives from the new carry and loop invariants alone (tanh's `1 - h^2`, say)
    # is recomputed from it in the reverse loop rather than stored.
    outvars = closed.jaxpr.outvars
    carry_index = {id(v): j for j, v in enumerate(outvars[n_res:]) if not isinstance(v, jex_core.Literal)}
    derivable = _derivable_from_carry(closed, len(hoisted_spec), n_res)
    source = [
        ("carry", carry_index[id(v)]) if var and id(v) in carry_index
        else ("derived", None) if var and v in derivable else ("kept" if var else "const", None)
        for v, var in zip(outvars[:n_res], varying)
    ]
    derived_vars = [v for v, (kind, _) in zip(outvars, source) if kind == "derived"]
    avals = [(v.aval.shape, v.aval.dtype) for v in outvars[:n_res]]
    site_inputs = [split.varying_inputs(site) for site in split.sites]
    recomputed = list({id(v): v for vs in site_inputs for v in vs}.values())

    def checked(leaves):
        # Residual order depends on the trace context (eager evaluation orders them differently);
        # the engine only ever traces, and this guards the layout it relies on.
        if [(jnp.shape(a), jnp.result_type(a)) for a in leaves] != avals:
            raise RuntimeError("jaxbptt internal error: the step's VJP residuals changed layout between traces.")
        return leaves

    @jax.jit  # traced, as in the analysis and in the loops, even when called eagerly
    def prepare(p, c, x):
        hoisted = split.hoist(jax.tree.leaves(p))
        leaves, _ = residual_leaves(hoisted, c, x)
        return hoisted, [leaf for leaf, (kind, _) in zip(checked(leaves), source) if kind == "const"]

    def forward(p, consts, c, x):
        del p
        (new_c, y), vjp_fn = vjp_of_run(consts[0], c, x)
        leaves = checked(jax.tree.leaves(vjp_fn))
        kept = [leaf for leaf, (kind, _) in zip(leaves, source) if kind == "kept"]
        return (new_c, new_c, kept) if as_post else (new_c, y, (kept, new_c))

    def backward(p, consts, out, prev_out, res, ct_carry, ct_out):
        del p, prev_out
        new_carry = new_carry_of(out, res)
        carry_leaves = jax.tree.leaves(new_carry)
        derived = _derive(closed, consts[0], carry_leaves, derived_vars)
        its = {"kept": iter(res if as_post else res[0]), "const": iter(consts[1]), "derived": iter(derived)}
        leaves = [carry_leaves[j] if kind == "carry" else next(its[kind]) for kind, j in source]
        vjp_fn = jax.tree.unflatten(treedef, leaves)
        if as_post:  # the output's cotangent is one on the new carry
            ct = jax.tree.map(lambda a, b, c: a + b if is_float(c) else a, ct_carry, ct_out, new_carry)
            ct_prev, ct_x, ct_sites = vjp_fn((as_jax_cotangent(ct, new_carry), None))
        else:
            ct_prev, ct_x, ct_sites = vjp_fn((as_jax_cotangent(ct_carry, new_carry), as_jax_cotangent(ct_out, out)))
        return as_engine_cotangent(ct_prev, new_carry), (ct_sites, ct_x)

    def grads(p, consts, carry_start, us, outs, prev_outs, res, locals_):
        del prev_outs
        hoisted = consts[0]
        new_carry = new_carry_of(outs, res)
        new_carries = jax.tree.leaves(new_carry)
        carries_in = jax.tree.map(lambda s, n: jnp.concatenate([s[None], n[:-1]]), carry_start, new_carry)
        ct_sites, ct_x = locals_
        values = jax.vmap(lambda c, x, n: split.per_step(hoisted, jax.tree.leaves(c), jax.tree.leaves(x),
                                                         want=recomputed, new_carry=n))(carries_in, us, new_carries)
        value_of = dict(zip(map(id, recomputed), values))
        d_hoisted = [None] * len(hoisted)
        for k, (site, inputs) in enumerate(zip(split.sites, site_inputs)):
            cts = ct_sites[k if site.same_cotangent_as is None else site.same_cotangent_as]
            stacked = [value_of[id(v)] for v in inputs]
            for i, d in split.site_vjp(site, hoisted, stacked, cts).items():
                d_hoisted[i] = d if d_hoisted[i] is None else d_hoisted[i] + d
        d_hoisted = [jnp.zeros_like(h) if d is None else d for d, h in zip(d_hoisted, hoisted)]
        _, hoist_vjp = jax.vjp(split.hoist, jax.tree.leaves(p))
        (dp,) = hoist_vjp(as_jax_cotangent(d_hoisted, hoisted))
        it = iter(ct_x)
        dus = [next(it) if fl else np.zeros(np.shape(a), jax.dtypes.float0)
               for a, fl in zip(jax.tree.leaves(us), x_float)]
        return p_tree.unflatten(dp), x_tree.unflatten(dus)

    return Kernel(prepare, identity_project, forward, backward, grads, post)


_NOT_CHEAP = frozenset({"dot_general", "conv_general_dilated", "reduce_precision", "sort", "cumsum", "fft"})


def _derivable_from_carry(closed, n_hoisted: int, n_res: int) -> set:
    """The residual variables of `closed` (outputs: residuals, then the new carry's leaves) that
    elementwise-cheap equations compute from the new carry and the hoisted inputs alone."""
    jaxpr = closed.jaxpr
    known = {v: None for v in list(jaxpr.constvars) + list(jaxpr.invars[:n_hoisted]) + list(jaxpr.outvars[n_res:])
             if not isinstance(v, jex_core.Literal)}
    by_id = {id(e): e for e in jaxpr.eqns}
    derivable = set()
    for v in jaxpr.outvars[:n_res]:
        if isinstance(v, jex_core.Literal) or v in known:
            continue
        cone = [by_id[i] for i in needed_equations(jaxpr, [v], known)]
        made = {u for e in cone for u in e.outvars}
        free = {u for e in cone for u in e.invars if not isinstance(u, jex_core.Literal)} - made
        if v in made and free <= known.keys() and all(
                e.primitive.name not in _NOT_CHEAP and not list(jex_core.jaxprs_in_params(e.params)) for e in cone):
            derivable.add(v)
    return derivable


def _derive(closed, hoisted, new_carry_leaves, variables) -> list:
    """The values of `variables` (see `_derivable_from_carry`) from the new carry."""
    if not variables:
        return []
    jaxpr = closed.jaxpr
    n_hoisted = len(hoisted)
    env = dict(zip(jaxpr.constvars, closed.consts))
    env.update(zip(jaxpr.invars[:n_hoisted], hoisted))
    n_res = len(jaxpr.outvars) - len(new_carry_leaves)
    env.update((v, c) for v, c in zip(jaxpr.outvars[n_res:], new_carry_leaves) if not isinstance(v, jex_core.Literal))
    return evaluate(jaxpr, env, variables)


def is_float(x) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def as_jax_cotangent(ct: PyTree, primal: PyTree) -> PyTree:
    """The engine keeps zero arrays as cotangents of integer leaves; JAX wants float0 zeros."""
    return jax.tree.map(lambda c, p: c if is_float(p) else np.zeros(np.shape(p), jax.dtypes.float0), ct, primal)


def as_engine_cotangent(ct: PyTree, primal: PyTree) -> PyTree:
    """Inverse of `as_jax_cotangent`: float0 cotangents of integer leaves become float32 zeros."""
    return jax.tree.map(lambda c, p: c if is_float(p) else jnp.zeros(np.shape(p), jnp.float32), ct, primal)
