"""The reverse-scan engine: blocked forward pass and one reverse scan for every gradient option.

Forward: for each block of steps (see `_remat.Plan`), project the block's inputs at once, run the
step loop, keep what the plan says, then apply the output map (and the loss) to the whole block.

Reverse: walk the blocks backwards. For each block, get its output cotangents at once (the VJP of
the output map and loss), run the carry-adjoint loop, then turn the block's per-step `local`
values into parameter and input gradients with one batched VJP. Inside the loop the state is a
stack of carry adjoints: one for exact BPTT and chunked truncation, ceil(k2 / k1) for
Williams-Peng truncation, where each chunk of k1 steps backpropagates its own errors through its own
window. Per step the loop may record the adjoint norm (diagnostics), cut an adjoint whose window starts
here (truncation) and rescale each adjoint to a maximal norm (per-step clipping). So truncation,
clipping, diagnostics and memory policies are options of this one loop, never separate paths.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import checkify

from .._engine.kernel import Kernel, is_float, kernel_for
from .._engine.remat import Plan
from .._types import PyTree

if TYPE_CHECKING:
    from .._core.options import Options


class Diagnostics(NamedTuple):
    """Per-step gradient-flow record of one reverse scan.

    Attributes:
      adjoint_norm: shape=(T,), the global L2 norm of the cotangent of the carry entering each step
        (summed over Williams-Peng windows), before clipping and truncation.
      clipped: shape=(T,), dtype=bool, whether per-step clipping rescaled that cotangent.
    """

    adjoint_norm: jax.Array
    clipped: jax.Array


def slice_time(tree: PyTree, start, size: int) -> PyTree:
    return jax.tree.map(lambda a: lax.dynamic_slice_in_dim(a, start, size, axis=0), tree)


def _concat_time(pieces: list[PyTree]) -> PyTree:
    """Join per-group outputs shaped (blocks, block_len, ...) into (T, ...) in time order."""
    flat = [jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:]), p) for p in pieces]
    if len(flat) == 1:
        return flat[0]
    return jax.tree.map(lambda *a: jnp.concatenate(a, axis=0), *flat)


def _block_loss(loss_fn, ys, targets):
    if loss_fn is None:  # no per-step loss (a loss of the final carry only)
        return jnp.zeros((), jnp.float32)
    return jnp.sum(jax.vmap(loss_fn)(ys, targets))


def assert_finite(tree, message: str, **fmt) -> None:
    """A `checkify` check that every float leaf of `tree` is finite (the opt-in checked mode)."""
    leaves = [a for a in jax.tree.leaves(tree) if is_float(a)]
    if leaves:
        checkify.check(jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in leaves])), message, **fmt)


def _run_block(kernel: Kernel, params, consts, carry, xs_block, length: int, unroll, check_from=None):
    """The block's `length` forward steps; with `check_from` (the block's first step), each step's
    carry and output are checked finite."""
    us = kernel.project(params, xs_block)

    def one_step(c, inputs):
        j, u = inputs
        c, out, res = kernel.forward(params, consts, c, u)
        if check_from is not None:
            assert_finite((c, out), "jaxbptt: non-finite carry or output in the forward pass at step {t}",
                          t=check_from + j)
        return c, (out, res)

    carry, (outs, res) = lax.scan(one_step, carry, (jnp.arange(length), us), unroll=unroll)
    return carry, outs, res


class Blocks(NamedTuple):
    """What the forward pass keeps of one group of equal blocks, stacked over the group's blocks."""

    carry: PyTree  # shape=(blocks, *carry): the carry entering each block
    outs: Optional[PyTree] = None  # shape=(blocks, block, ...): every step's `out`; None when recomputed
    res: Optional[PyTree] = None  # shape=(blocks, block, ...): every step's `res`; None when recomputed


class Saved(NamedTuple):
    """What the forward pass keeps for the reverse scan, per memory policy (`_remat.Plan`).

    - `remat=None` (`plan.store`): `groups` holds, per group of `plan.groups`, the `Blocks` with
      every step's `out` and `res`;
    - every s steps, `"sqrt"`: `groups` holds, per group, the `Blocks` with the carry entering each
      block only (each block is recomputed from it);
    - a binomial schedule (`plan.schedule`): `groups` is empty and `start` is the initial carry, the
      schedule's first snapshot (it recomputes and stores everything else itself);
    - `remat=Invert()` (`plan.invert`): `groups` is empty and `end` is the final carry, from which the
      step's inverse rebuilds every other.
    """

    groups: tuple[Blocks, ...] = ()
    start: Optional[PyTree] = None  # the initial carry, for a binomial schedule only
    end: Optional[PyTree] = None  # the final carry, for remat=Invert() only


def forward(kernel: Kernel, params, consts, carry, xs, plan: Plan, opts: "Options", *, loss=None):
    """Run the sequence forward, keeping what `plan` asks for.

    Args:
      opts: the call's options (`unroll`; `check_finite` adds `checkify` checks naming the first step
        with a non-finite value).
      loss: None to return the stacked outputs `ys`; `(loss_fn, targets)` to return instead the sum
        of per-step losses, computed block by block so that `ys` is never stored whole.

    Returns:
      `(final_carry, ys_or_loss, saved)`, `saved` a `Saved`.
    """
    if plan.invert:
        check_inverse(kernel, params, consts, carry, xs)
    start_carry, groups, heads = carry, [], []
    for start, block, count in plan.groups:

        def block_fn(c, i, start=start, block=block):
            t0 = start + i * block
            c_end, outs, res = _run_block(kernel, params, consts, c, slice_time(xs, t0, block), block, opts.unroll,
                                          t0 if opts.check_finite else None)
            ys = kernel.post(params, outs)
            if loss is None:
                head = ys
            else:
                loss_fn, targets = loss
                head = _block_loss(loss_fn, ys, slice_time(targets, t0, block))
            keep = None if plan.schedule is not None or plan.invert else Blocks(c, outs, res) if plan.store else Blocks(c)
            return c_end, (keep, head)

        carry, (keep, head) = lax.scan(block_fn, carry, jnp.arange(count))
        groups.append(keep)
        heads.append(head)
    saved = Saved(start=start_carry) if plan.schedule is not None else Saved(groups=tuple(groups))
    if plan.invert:  # nothing kept but the final carry, from which the inverse rebuilds every other
        saved = Saved(end=carry)
    if loss is None:
        return carry, _concat_time(heads), saved
    return carry, sum(jnp.sum(h) for h in heads), saved


def global_norm(tree, keep: int = 1, axis_name=None) -> jax.Array:
    """L2 norm over every leaf and every axis but the leading `keep` ones (one norm per adjoint, or per
    adjoint and batch row), accumulated in >= float32; with `axis_name`, also over the shards of a
    mapped (batch-split) axis.

    Scaled by the largest magnitude, so a norm that fits the dtype is finite even when its square
    overflows or underflows (float32 squares overflow above ~1.8e19). A complex leaf counts with
    its modulus. A zero norm has a zero (not NaN) derivative, so second derivatives through
    clipping stay finite where a cotangent is exactly zero.
    """
    leaves = [jnp.abs(a) if jnp.iscomplexobj(a) else a for a in jax.tree.leaves(tree)]
    leaves = [a.astype(jnp.promote_types(a.dtype, jnp.float32)) for a in leaves]
    if not leaves:
        return jnp.zeros((1,) * keep, jnp.float32)
    per_leaf = lambda f: jnp.stack([f(a, axis=tuple(range(keep, a.ndim))) for a in leaves])
    scale = jnp.max(per_leaf(lambda a, axis: jnp.max(jnp.abs(a), axis=axis, initial=0)), axis=0)
    scale = lax.stop_gradient(scale if axis_name is None else lax.pmax(scale, axis_name))
    safe = jnp.where(scale > 0, scale, 1)
    squares = jnp.sum(per_leaf(lambda a, axis: jnp.sum(jnp.square(a / _expand(safe, a)), axis=axis)), axis=0)
    squares = squares if axis_name is None else lax.psum(squares, axis_name)
    norm = jnp.where(squares == 0, 0, safe * jnp.sqrt(jnp.where(squares == 0, 1, squares)))  # NaN stays NaN
    return jnp.where(jnp.isinf(scale), scale, norm)


def _clip_norms(tree, scope: str, axis_name=None) -> jax.Array:
    """The norms that per-step clipping compares with `clip_norm`: shape (adjoints,) for scope "batch"
    (the global norm), (adjoints, batch) for scope "example" (one norm per row of the carry's leading
    batch axis; rows never span shards, so no reduction over `axis_name`)."""
    if scope == "batch":
        return global_norm(tree, 1, axis_name)
    return global_norm(tree, 2)


def _expand(mask, leaf):
    return mask.reshape(mask.shape + (1,) * (leaf.ndim - mask.ndim))


def _adjoint_step(kernel, params, consts, out, prev_out, res, adjoints, ct_out, t, opts: "Options"):
    """One step of the reverse loop: adjoints hold the cotangents of carry_t, one per live window."""
    trunc, clip_norm, axis_name = opts.truncation, opts.clip_norm, opts.axis_name
    m = trunc.adjoints
    if m == 1:
        a = jax.tree.map(lambda s: s[0], adjoints)
        a_prev, local = kernel.backward(params, consts, out, prev_out, res, a, ct_out)
        a_prev = jax.tree.map(lambda x: x[None], a_prev)
    else:
        own = jnp.arange(m) == (t // trunc.chunk) % m  # the errors at t belong to t's own chunk
        ct_out_adjoints = jax.tree.map(
            lambda c: jnp.broadcast_to(c, (m,) + c.shape) if c.dtype == jax.dtypes.float0  # an integer output's
            else jnp.where(_expand(own, c[None]), c[None], 0).astype(c.dtype), ct_out)
        backward = jax.vmap(kernel.backward, in_axes=(None, None, None, None, None, 0, 0))
        a_prev, local_adjoints = backward(params, consts, out, prev_out, res, adjoints, ct_out_adjoints)
        local = jax.tree.map(lambda x: jnp.sum(x, axis=0), local_adjoints)

    a_prev = jax.tree.map(lambda x, s: x.astype(s.dtype), a_prev, adjoints)  # kernels may compute in float32
    if opts.check_finite:
        assert_finite(a_prev, "jaxbptt: non-finite cotangent in the backward pass, of the carry entering step {t}", t=t)
    record = None
    if opts.diagnostics:
        total = a_prev if m == 1 else jax.tree.map(lambda x: jnp.sum(x, axis=0, keepdims=True), a_prev)
        record = [global_norm(total, 1, axis_name)[0], jnp.zeros((), bool)]
    if trunc.active:
        # The window whose first step is t re-runs from stop_gradient(carry entering t).
        opens = (t + trunc.window) % trunc.chunk == 0
        cut = (jnp.arange(m) == ((t + trunc.window) // trunc.chunk - 1) % m) & opens & (t > 0)
        a_prev = jax.tree.map(lambda x: jnp.where(_expand(cut, x), jnp.zeros((), x.dtype), x), a_prev)
    if clip_norm is not None:
        norms = _clip_norms(a_prev, opts.clip_scope, axis_name)
        over = norms > clip_norm
        scale = jnp.where(over, clip_norm / jnp.where(over, norms, 1), 1)
        a_prev = jax.tree.map(lambda x: (x * _expand(scale, x)).astype(x.dtype), a_prev)
        if opts.diagnostics:
            record[1] = jnp.any(over)
    return a_prev, local, (tuple(record) if opts.diagnostics else None)


def _add(acc, tree):
    return jax.tree.map(lambda a, b: a + b.astype(a.dtype), acc, tree)


def accumulator_like(params) -> PyTree:
    """Zero gradients with at least float32 precision for accumulation over blocks."""
    return jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.promote_types(p.dtype, jnp.float32)), params)


class _Backward(NamedTuple):
    """What every block of one reverse scan shares (the options and the traced inputs)."""

    kernel: Kernel
    params: Any
    consts: Any
    xs: Any
    ct_ys: Any
    loss: Any
    opts: "Options"
    x_diff: list

    def block(self, adjoints, acc, t0, length: int, carry_start, stored=None):
        """Reverse the block [t0, t0 + length): its output cotangents, the carry-adjoint loop, then its
        parameter and input gradients. `stored` is the block's `(outs, res)`, or None to recompute
        them from `carry_start`. Returns `(adjoints, acc, dx, record)`."""
        kernel, params, consts = self.kernel, self.params, self.consts
        xs_block = slice_time(self.xs, t0, length)
        if stored is None:
            _, outs, res = _run_block(kernel, params, consts, carry_start, xs_block, length, self.opts.unroll)
        else:
            outs, res = stored
        if self.loss is None:
            _, post_vjp = jax.vjp(kernel.post, params, outs)
            dp_post, ct_outs = post_vjp(slice_time(self.ct_ys, t0, length))
        else:
            loss_fn, targets = self.loss
            tg = slice_time(targets, t0, length)
            value, head_vjp = jax.vjp(lambda p, o: _block_loss(loss_fn, kernel.post(p, o), tg), params, outs)
            dp_post, ct_outs = head_vjp(jnp.ones_like(value))

        prev_outs = None
        if kernel.previous_out is not None:
            first = kernel.previous_out(carry_start)
            prev_outs = jax.tree.map(lambda f, o: jnp.concatenate([f[None], o[:-1]]), first, outs)

        def step_fn(adjoints, inputs):
            j, (out, prev_out, r, ct_out) = inputs
            adjoints, local, record = _adjoint_step(kernel, params, consts, out, prev_out, r, adjoints, ct_out, t0 + j,
                                                 self.opts)
            return adjoints, (local, record)

        adjoints, (locals_, record) = lax.scan(
            step_fn, adjoints, (jnp.arange(length), (outs, prev_outs, res, ct_outs)), reverse=True, unroll=self.opts.unroll
        )
        x_leaves, x_tree = jax.tree.flatten(xs_block)

        def project(p, float_leaves):
            it = iter(float_leaves)
            return kernel.project(p, x_tree.unflatten([next(it) if d else x for x, d in zip(x_leaves, self.x_diff)]))

        us, project_vjp = jax.vjp(project, params, [x for x, d in zip(x_leaves, self.x_diff) if d])
        dp_core, dus = kernel.grads(params, consts, carry_start, us, outs, prev_outs, res, locals_)
        dus = jax.tree.map(lambda d, u: d if d.dtype == jax.dtypes.float0 else d.astype(u.dtype), dus, us)
        dp_proj, dx = project_vjp(dus)
        acc = _add(_add(_add(acc, dp_post), dp_core), dp_proj)
        if self.opts.check_finite:
            assert_finite(acc, "jaxbptt: non-finite parameter gradient in the backward pass, from steps {t0} "
                          "to {t1}", t0=t0, t1=t0 + length - 1)
        return adjoints, acc, dx, record


def _revolve(bwd: _Backward, plan: Plan, saved: Saved, adjoints, acc):
    """Run a binomial schedule (`_remat.Schedule`) as one `lax.scan` with a static trip count (so
    that it can itself be differentiated): each iteration may restore the current carry from a
    snapshot, then reverses the current unit with `_Backward.block` or advances the carry over it,
    and may store the carry reached."""
    schedule = plan.schedule
    carry0 = saved.start
    unit, tail_length = plan.groups[0][1], plan.groups[-1][1]
    record_shape = jax.eval_shape(lambda: bwd.block(adjoints, acc, jnp.zeros((), jnp.int32), unit, carry0)[2:])
    buffers = jax.tree.map(lambda a: jnp.zeros((plan.length,) + a.shape[1:], a.dtype), record_shape)
    snaps = jax.tree.map(lambda c: jnp.zeros((schedule.slots,) + c.shape, c.dtype).at[0].set(c), carry0)

    def advance(carry, t0, adjoints, acc, buffers):
        carry, _, _ = _run_block(bwd.kernel, bwd.params, bwd.consts, carry, slice_time(bwd.xs, t0, unit), unit,
                                 bwd.opts.unroll)
        return carry, adjoints, acc, buffers

    def reverse(length):
        def run(carry, t0, adjoints, acc, buffers):
            adjoints, acc, *out = bwd.block(adjoints, acc, t0, length, carry)
            buffers = jax.tree.map(lambda b, v: lax.dynamic_update_slice_in_dim(b, v, t0, 0), buffers, tuple(out))
            return carry, adjoints, acc, buffers

        return run

    branches = [advance, reverse(unit)] + ([reverse(tail_length)] if schedule.tail else [])

    def body(state, _):
        cursor, carry, snaps, adjoints, acc, buffers = state
        move, cursor = schedule.move(cursor)
        carry = jax.tree.map(lambda s, c: jnp.where(move.restore, s[move.source], c), snaps, carry)
        branch = jnp.where(move.reverse, 1 + (schedule.tail & (move.unit == schedule.units - 1)), 0)
        carry, adjoints, acc, buffers = lax.switch(branch, branches, carry, move.unit * unit, adjoints, acc, buffers)
        snaps = jax.tree.map(lambda s, c: s.at[move.destination].set(jnp.where(move.store, c, s[move.destination])),
                             snaps, carry)
        return (cursor, carry, snaps, adjoints, acc, buffers), None

    state = (schedule.start(), carry0, snaps, adjoints, acc, buffers)
    (_, _, _, adjoints, acc, (dx, record)), _ = lax.scan(body, state, length=schedule.steps)
    return adjoints, acc, dx, record


def check_inverse(kernel: Kernel, params, consts, carry, xs) -> None:
    """Trace-time checks of `remat=Invert()`: the step declares an inverse, which returns a carry like
    the step's."""
    if kernel.inverse is None:
        raise ValueError(
            "remat=jaxbptt.Invert() rebuilds each carry from the next with the step's inverse, but this step "
            "declares none. Declare it with jaxbptt.invertible(step, inverse), use an invertible step "
            "(jaxbptt.revgru, jaxbptt.revlstm, jaxbptt.coupled), or choose another remat policy."
        )
    u = jax.eval_shape(lambda: jax.tree.map(lambda a: a[0], kernel.project(params, slice_time(xs, 0, 1))))
    rebuilt, _ = jax.eval_shape(kernel.inverse, params, consts, carry, u)
    expected = jax.eval_shape(lambda: carry)
    avals = lambda tree: [(a.shape, a.dtype) for a in jax.tree.leaves(tree)]
    if jax.tree.structure(rebuilt) != jax.tree.structure(expected) or avals(rebuilt) != avals(expected):
        raise TypeError(f"the step's inverse must return a carry like the step's (remat=jaxbptt.Invert()): the "
                        f"carry is {expected} but inverse(params, carry, x) returned {rebuilt}.")


def _invert(bwd: _Backward, plan: Plan, saved: Saved, adjoints, acc):
    """Walk the blocks backwards from the final carry (`remat=Invert()`): rebuild each block's starting
    carry with the step's inverse, run backwards over the block's steps, then reverse the block with
    `_Backward.block` from it (with the steps' `(out, res)` when the inverse returns them)."""
    kernel, params, consts = bwd.kernel, bwd.params, bwd.consts
    carry, dx_groups, diag_groups = saved.end, [], []
    for start, block, count in reversed(plan.groups):

        def block_fn(state, i, start=start, block=block):
            carry, adjoints, acc = state
            t0 = start + i * block
            us = kernel.project(params, slice_time(bwd.xs, t0, block))
            carry, kept = lax.scan(lambda c, u: kernel.inverse(params, consts, c, u), carry, us, reverse=True,
                                   unroll=bwd.opts.unroll)
            adjoints, acc, dx, record = bwd.block(adjoints, acc, t0, block, carry, kept)
            return (carry, adjoints, acc), (dx, record)

        (carry, adjoints, acc), (dx, record) = lax.scan(block_fn, (carry, adjoints, acc), jnp.arange(count), reverse=True)
        dx_groups.insert(0, dx)
        diag_groups.insert(0, record)
    return adjoints, acc, _concat_time(dx_groups), _concat_time(diag_groups)


def backward(kernel: Kernel, params, consts, xs, saved: Saved, plan: Plan, opts: "Options", *, ct_final, ct_ys=None,
             loss=None):
    """The reverse scan.

    Args:
      saved: what `forward` kept under `plan`.
      opts: the call's options: truncation, clipping (`clip_scope` "batch" clips each adjoint's global
        norm, "example" each row of the carry's leading batch axis on its own), diagnostics (the
        global norm either way; `clipped` is then true when any example was rescaled), `need_xs`,
        `unroll`, `check_finite`, `axis_name`.
      ct_final: cotangent of the final carry (an error of the last chunk under truncation).
      ct_ys: cotangents of the stacked outputs, or None when `loss` is given.
      loss: `(loss_fn, targets)`: output cotangents are the gradients of the summed per-step loss.

    Returns:
      `(dparams, dcarry, dxs, diag)`; `dxs` is None unless `opts.need_xs` (float0 zeros for integer
      leaves), `diag` is None unless `opts.diagnostics`. `dparams` is accumulated in at least
      float32; `dcarry` holds float32 zeros for integer carry leaves.
    """
    trunc = opts.truncation
    m = trunc.adjoints
    last_own = ((plan.length - 1) // trunc.chunk) % m if m > 1 else 0
    adjoints = jax.tree.map(
        lambda c: jnp.zeros((m,) + c.shape, c.dtype).at[last_own].set(c), ct_final
    )
    acc = accumulator_like(params)
    x_diff = [opts.need_xs and is_float(x) for x in jax.tree.leaves(xs)]
    bwd = _Backward(kernel, params, consts, xs, ct_ys, loss, opts, x_diff)
    if plan.schedule is not None:
        adjoints, acc, dx_flat, record = _revolve(bwd, plan, saved, adjoints, acc)
    elif plan.invert:
        adjoints, acc, dx_flat, record = _invert(bwd, plan, saved, adjoints, acc)
    else:
        dx_groups, diag_groups = [], []
        for g in reversed(range(len(plan.groups))):
            start, block, count = plan.groups[g]

            def block_fn(state, inputs, start=start, block=block):
                i, kept = inputs
                stored = (kept.outs, kept.res) if plan.store else None
                adjoints, acc, dx, record = bwd.block(*state, start + i * block, block, kept.carry, stored)
                return (adjoints, acc), (dx, record)

            (adjoints, acc), (dx, record) = lax.scan(block_fn, (adjoints, acc), (jnp.arange(count), saved.groups[g]),
                                                  reverse=True)
            dx_groups.insert(0, dx)
            diag_groups.insert(0, record)
        dx_flat, record = _concat_time(dx_groups), _concat_time(diag_groups)

    dcarry = jax.tree.map(lambda s: jnp.sum(s, axis=0), adjoints)
    dxs = None
    if opts.need_xs:
        dx_it = iter(dx_flat)
        dxs = jax.tree.map(lambda x: next(dx_it) if is_float(x) else np.zeros(x.shape, jax.dtypes.float0), xs)
    diag = Diagnostics(*record) if opts.diagnostics else None
    return acc, dcarry, dxs, diag


def zero_length_outputs(step, params, carry, xs):
    """`(final_carry, ys)` for a sequence of no steps: the carry, and empty outputs."""
    x = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), xs)
    _, y = jax.eval_shape(step, params, carry, x)
    return carry, jax.tree.map(lambda s: jnp.zeros((0,) + s.shape, s.dtype), y)


def rows_per_step(carry) -> int:
    """Batch rows of one step (carry elements per feature), which sizes the blocks."""
    leaves = jax.tree.leaves(carry)
    if not leaves:
        return 1
    leaf = max(leaves, key=lambda a: a.size)
    return max(1, leaf.size // max(1, leaf.shape[-1] if leaf.ndim else 1))


def carry_elements(carry) -> int:
    """Elements of one step's carry (all leaves), which bounds the blocks of narrow carries."""
    return sum(int(np.size(a)) for a in jax.tree.leaves(carry))


def setup(step, params, carry, xs):
    """The kernel of `step` and its loop invariants for one call."""
    x_first = jax.tree.map(lambda a: a[:1], xs)
    kernel = kernel_for(step, params, carry, jax.tree.map(lambda a: a[0], x_first))
    u_first = jax.tree.map(lambda a: a[0], kernel.project(params, x_first))
    return kernel, kernel.prepare(params, carry, u_first)
