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
`out` is not part of the carry set `previous_out=None` and receive None. `backward` is the only piece inside the sequential reverse loop and touches nothing but the carry
adjoint; it must be linear in `(ct_carry, ct_out)`, and so must `local`, the per-step value from
which `grads` forms parameter and input gradients for a whole block of steps at once (large matrix
products instead of one small accumulation per step). `consts = prepare(params, carry, u)` holds
loop-invariant values, computed once outside every loop.

Built-in cells supply hand-derived kernels (see `_cells.py`). Any other step gets `generic_kernel`:
`forward` keeps only the time-varying residuals of the step's VJP with respect to the carry (what
depends on the parameters alone, such as the weight matrices, is found by a dependency walk over the
step's jaxpr and kept once in `consts`; residuals that are leaves of the new carry are read from the
stored carry), and `grads` evaluates the parameter VJP of the step over all the block's steps at
once, with time folded into the batch axis when `_fold.is_rowwise` proves that exact, else vmapped
over time with the parameters unbatched.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from ._fold import is_rowwise
from ._types import PyTree


class Kernel(NamedTuple):
    """The engine's view of a step (see the module docstring for each piece's contract)."""

    prepare: Callable[..., PyTree]
    project: Callable[..., PyTree]
    forward: Callable[..., tuple[PyTree, PyTree, PyTree]]
    backward: Callable[..., tuple[PyTree, PyTree]]
    grads: Callable[..., tuple[PyTree, PyTree]]
    post: Callable[..., PyTree]
    previous_out: Optional[Callable[[PyTree], PyTree]] = None


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
    """The hand-derived kernel of a built-in step, else the generic kernel of `step`."""
    if isinstance(step, Step) and (
        not step.same_batch or len({np.shape(a)[:-1] for a in jax.tree.leaves((carry, x))}) == 1
    ):
        return step.make_kernel(params, carry, x)
    return generic_kernel(step, params, carry, x)


def identity_project(params, xs):
    del params
    return xs


def identity_post(params, outs):
    del params
    return outs


def _varying_outputs(closed_jaxpr, varying_inputs: list[bool]) -> list[bool]:
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
    """A `Kernel` for any step, derived with `jax.vjp` (see the module docstring).

    `carry` and `u` are one step's carry and input (arrays or `jax.ShapeDtypeStruct`s); they fix
    the residual layout, found once by tracing the step.
    """
    structure: dict[str, Any] = {}
    user_step = step
    step = lambda p, c, x: tuple(user_step(p, c, x))  # as in lax.scan, a list [carry, y] is a pair

    def residual_leaves(p, c, x):
        (new_c, _), vjp_fn = jax.vjp(lambda c_: step(p, c_, x), c)
        leaves, structure["treedef"] = jax.tree.flatten(vjp_fn)
        return leaves, jax.tree.leaves(new_c)

    closed = jax.make_jaxpr(residual_leaves)(params, carry, u)
    n_params = len(jax.tree.leaves(params))
    n_rest = len(jax.tree.leaves(carry)) + len(jax.tree.leaves(u))
    treedef = structure["treedef"]
    n_res = treedef.num_leaves
    varying = _varying_outputs(closed, [False] * n_params + [True] * n_rest)[:n_res]
    # A residual that is a leaf of the new carry (tanh's output, say) is read from the stored carry.
    outvars = closed.jaxpr.outvars
    carry_index = {id(v): j for j, v in enumerate(outvars[n_res:]) if not isinstance(v, jex_core.Literal)}
    source = [
        ("carry", carry_index[id(v)]) if var and id(v) in carry_index else ("kept" if var else "const", None)
        for v, var in zip(outvars[:n_res], varying)
    ]

    avals = [(v.aval.shape, v.aval.dtype) for v in outvars[:n_res]]

    def checked(leaves):
        # Residual order depends on the trace context (eager evaluation orders them differently);
        # the engine only ever traces, and this guards the layout it relies on.
        if [(jnp.shape(a), jnp.result_type(a)) for a in leaves] != avals:
            raise RuntimeError("jaxbptt internal error: the step's VJP residuals changed layout between traces.")
        return leaves

    @jax.jit  # traced, as in the analysis and in the loops, even when called eagerly
    def prepare(p, c, x):
        leaves, _ = residual_leaves(p, c, x)
        return [leaf for leaf, (kind, _) in zip(checked(leaves), source) if kind == "const"]

    def forward(p, consts, c, x):
        del consts
        (new_c, y), vjp_fn = jax.vjp(lambda c_: step(p, c_, x), c)
        leaves = checked(jax.tree.leaves(vjp_fn))
        kept = [leaf for leaf, (kind, _) in zip(leaves, source) if kind == "kept"]
        return new_c, y, (kept, new_c)

    def backward(p, consts, out, prev_out, res, ct_carry, ct_out):
        del p, prev_out
        kept, new_carry = res
        its = {"kept": iter(kept), "const": iter(consts)}
        carry_leaves = jax.tree.leaves(new_carry)
        leaves = [carry_leaves[j] if kind == "carry" else next(its[kind]) for kind, j in source]
        vjp_fn = jax.tree.unflatten(treedef, leaves)
        (ct_prev,) = vjp_fn((as_jax_cotangent(ct_carry, new_carry), as_jax_cotangent(ct_out, out)))
        return as_engine_cotangent(ct_prev, new_carry), (ct_carry, ct_out)

    def grads(p, consts, carry_start, us, outs, prev_outs, res, locals_):
        del consts, prev_outs
        carries_in = jax.tree.map(lambda s, n: jnp.concatenate([s[None], n[:-1]]), carry_start, res[1])
        ct_carry, ct_out = locals_
        cts = (as_jax_cotangent(ct_carry, carries_in), as_jax_cotangent(ct_out, outs))
        first = (_spec(p), _spec(carries_in, lambda s: s[1:]), _spec(us, lambda s: s[1:]))
        folded = (_spec(carries_in, _fold_shape), _spec(us, _fold_shape))
        if is_rowwise(step, *first, *folded):
            # Time folded into the leading (batch) axis: one 2-D VJP for the whole block.
            fold = functools.partial(jax.tree.map, lambda a: a.reshape(_fold_shape(a.shape)))
            _, vjp_fn = jax.vjp(lambda p_, us_: step(p_, fold(carries_in), fold(us_)), p, us)
            return vjp_fn(fold(cts))
        batched = jax.vmap(step, in_axes=(None, 0, 0))
        _, vjp_fn = jax.vjp(lambda p_, us_: batched(p_, carries_in, us_), p, us)
        return vjp_fn(cts)

    return Kernel(prepare, identity_project, forward, backward, grads, identity_post)


def _fold_shape(shape):
    return (shape[0] * shape[1],) + tuple(shape[2:]) if len(shape) >= 2 else tuple(shape)


def _spec(tree: PyTree, shape=lambda s: s) -> PyTree:
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(shape(tuple(np.shape(a))), jnp.result_type(a)), tree)


def is_float(x) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def as_jax_cotangent(ct: PyTree, primal: PyTree) -> PyTree:
    """The engine keeps zero arrays as cotangents of integer leaves; JAX wants float0 zeros."""
    return jax.tree.map(lambda c, p: c if is_float(p) else np.zeros(np.shape(p), jax.dtypes.float0), ct, primal)


def as_engine_cotangent(ct: PyTree, primal: PyTree) -> PyTree:
    """Inverse of `as_jax_cotangent`: float0 cotangents of integer leaves become float32 zeros."""
    return jax.tree.map(lambda c, p: c if is_float(p) else jnp.zeros(np.shape(p), jnp.float32), ct, primal)
