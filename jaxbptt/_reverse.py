"""The reverse-scan engine: blocked forward pass and one reverse scan for every gradient option.

Forward: for each block of steps (see `_remat.Plan`), project the block's inputs at once, run the
step loop, keep what the plan says, then apply the output map (and the loss) to the whole block.

Reverse: walk the blocks backwards. For each block, get its output cotangents at once (the VJP of
the output map and loss), run the carry-adjoint loop, then turn the block's per-step `local`
values into parameter and input gradients with one batched VJP. Inside the loop the state is a
stack of `slots` carry adjoints: one for exact BPTT and chunked truncation, ceil(k2 / k1) for
Williams-Peng truncation, where each chunk of k1 steps backpropagates its own errors through its own
window. Per step the loop may record the adjoint norm (diagnostics), cut a slot whose window starts
here (truncation) and rescale each slot to a maximal norm (per-step clipping). So truncation,
clipping, diagnostics and memory policies are options of this one loop, never separate paths.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ._kernel import Kernel, is_float, kernel_for
from ._remat import Plan
from ._types import PyTree


class Truncation(NamedTuple):
    """Static shape of a truncation option; `k1` and `k2` may be traced when `slots == 1`."""

    slots: int  # number of carry adjoints alive at once
    k1: Any
    k2: Any
    active: bool  # False when no step can cut (exact BPTT)


EXACT = Truncation(slots=1, k1=1, k2=1, active=False)


def truncation_spec(truncation, length: int) -> Truncation:
    """Map a validated `truncation` option to the loop's slot layout for a sequence of `length`."""
    if truncation is None or length == 0:
        return EXACT
    if isinstance(truncation, tuple):
        k1, k2 = truncation
        chunks = math.ceil(length / k1)
        # Chunk j's window opens at t = (j + 1) * k1 - k2; a cut needs such a t in [1, T) with
        # j < chunks. When one exists, chunks * k1 > k2, so ceil(k2 / k1) <= chunks.
        first_cut = (-k2) % k1 or k1
        if first_cut > min(length - 1, chunks * k1 - k2):
            return EXACT
        return Truncation(min(math.ceil(k2 / k1), chunks), k1, k2, True)
    if isinstance(truncation, int):
        return EXACT if truncation >= length else Truncation(1, truncation, truncation, True)
    return Truncation(1, truncation, truncation, True)  # traced chunk length


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
    return jnp.sum(jax.vmap(loss_fn)(ys, targets))


def _run_block(kernel: Kernel, params, consts, carry, xs_block, unroll):
    us = kernel.project(params, xs_block)

    def one_step(c, u):
        c, out, res = kernel.forward(params, consts, c, u)
        return c, (out, res)

    carry, (outs, res) = lax.scan(one_step, carry, us, unroll=unroll)
    return carry, outs, res


def forward(kernel: Kernel, params, consts, carry, xs, plan: Plan, *, loss=None, unroll=1):
    """Run the sequence forward, keeping what `plan` asks for.

    Args:
      loss: None to return the stacked outputs `ys`; `(loss_fn, targets)` to return instead the sum
        of per-step losses, computed block by block so that `ys` is never stored whole.

    Returns:
      `(final_carry, ys_or_loss, saved)`, `saved` being one entry per group of blocks.
    """
    saved, heads = [], []
    for start, block, count in plan.groups:

        def block_fn(c, i, start=start, block=block):
            t0 = start + i * block
            c_end, outs, res = _run_block(kernel, params, consts, c, slice_time(xs, t0, block), unroll)
            ys = kernel.post(params, outs)
            if loss is None:
                head = ys
            else:
                loss_fn, targets = loss
                head = _block_loss(loss_fn, ys, slice_time(targets, t0, block))
            return c_end, ((c, outs, res) if plan.store else c, head)

        carry, (keep, head) = lax.scan(block_fn, carry, jnp.arange(count))
        saved.append(keep)
        heads.append(head)
    if loss is None:
        return carry, _concat_time(heads), saved
    return carry, sum(jnp.sum(h) for h in heads), saved


def _global_norm_per_slot(tree) -> jax.Array:
    """L2 norm over every leaf and axis but the leading slot axis, accumulated in >= float32."""
    squares = [
        jnp.sum(jnp.square(a.astype(jnp.promote_types(a.dtype, jnp.float32))), axis=tuple(range(1, a.ndim)))
        for a in jax.tree.leaves(tree)
    ]
    return jnp.sqrt(sum(squares))


def _expand(mask, leaf):
    return mask.reshape(mask.shape + (1,) * (leaf.ndim - mask.ndim))


def _adjoint_step(kernel, params, consts, out, prev_out, res, slots, ct_out, t, trunc, clip_norm, diagnostics):
    """One step of the reverse loop: slots hold the cotangents of carry_t, one per live window."""
    m = trunc.slots
    if m == 1:
        a = jax.tree.map(lambda s: s[0], slots)
        a_prev, local = kernel.backward(params, consts, out, prev_out, res, a, ct_out)
        a_prev = jax.tree.map(lambda x: x[None], a_prev)
    else:
        own = jnp.arange(m) == (t // trunc.k1) % m  # the errors at t belong to t's own chunk
        ct_out_slots = jax.tree.map(lambda c: jnp.where(_expand(own, c[None]), c[None], 0).astype(c.dtype), ct_out)
        backward = jax.vmap(kernel.backward, in_axes=(None, None, None, None, None, 0, 0))
        a_prev, local_slots = backward(params, consts, out, prev_out, res, slots, ct_out_slots)
        local = jax.tree.map(lambda x: jnp.sum(x, axis=0), local_slots)

    record = None
    if diagnostics:
        total = a_prev if m == 1 else jax.tree.map(lambda x: jnp.sum(x, axis=0, keepdims=True), a_prev)
        record = [_global_norm_per_slot(total)[0], jnp.zeros((), bool)]
    if trunc.active:
        # The window whose first step is t re-runs from stop_gradient(carry entering t).
        opens = (t + trunc.k2) % trunc.k1 == 0
        cut = (jnp.arange(m) == ((t + trunc.k2) // trunc.k1 - 1) % m) & opens & (t > 0)
        a_prev = jax.tree.map(lambda x: jnp.where(_expand(cut, x), jnp.zeros((), x.dtype), x), a_prev)
    if clip_norm is not None:
        norms = _global_norm_per_slot(a_prev)
        over = norms > clip_norm
        scale = jnp.where(over, clip_norm / jnp.where(over, norms, 1), 1)
        a_prev = jax.tree.map(lambda x: (x * _expand(scale, x)).astype(x.dtype), a_prev)
        if diagnostics:
            record[1] = jnp.any(over)
    return a_prev, local, (tuple(record) if diagnostics else None)


def _add(acc, tree):
    return jax.tree.map(lambda a, b: a + b.astype(a.dtype), acc, tree)


def accumulator_like(params) -> PyTree:
    """Zero gradients with at least float32 precision for accumulation over blocks."""
    return jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.promote_types(p.dtype, jnp.float32)), params)


def backward(
    kernel: Kernel,
    params,
    consts,
    xs,
    saved,
    plan: Plan,
    *,
    ct_final,
    ct_ys=None,
    loss=None,
    trunc: Truncation = EXACT,
    clip_norm: Optional[Any] = None,
    diagnostics: bool = False,
    unroll=1,
    need_xs: bool = True,
):
    """The reverse scan.

    Args:
      ct_final: cotangent of the final carry (an error of the last chunk under truncation).
      ct_ys: cotangents of the stacked outputs, or None when `loss` is given.
      loss: `(loss_fn, targets)`: output cotangents are the gradients of the summed per-step loss.

    Returns:
      `(dparams, dcarry, dxs, diag)`; `dxs` is None unless `need_xs` (float0 zeros for integer
      leaves), `diag` is None unless `diagnostics`. `dparams` is accumulated in at least float32;
      `dcarry` holds float32 zeros for integer carry leaves.
    """
    m = trunc.slots
    last_own = ((plan.length - 1) // trunc.k1) % m if m > 1 else 0
    slots = jax.tree.map(
        lambda c: jnp.zeros((m,) + c.shape, c.dtype).at[last_own].set(c), ct_final
    )
    acc = accumulator_like(params)
    x_diff = [need_xs and is_float(x) for x in jax.tree.leaves(xs)]
    dx_groups, diag_groups = [], []
    for g in reversed(range(len(plan.groups))):
        start, block, count = plan.groups[g]

        def block_fn(state, inputs, start=start, block=block):
            slots, acc = state
            i, kept = inputs
            t0 = start + i * block
            xs_block = slice_time(xs, t0, block)
            if plan.store:
                carry_start, outs, res = kept
            else:
                carry_start = kept
                _, outs, res = _run_block(kernel, params, consts, carry_start, xs_block, unroll)
            if loss is None:
                _, post_vjp = jax.vjp(kernel.post, params, outs)
                dp_post, ct_outs = post_vjp(slice_time(ct_ys, t0, block))
            else:
                loss_fn, targets = loss
                tg = slice_time(targets, t0, block)
                value, head_vjp = jax.vjp(lambda p, o: _block_loss(loss_fn, kernel.post(p, o), tg), params, outs)
                dp_post, ct_outs = head_vjp(jnp.ones_like(value))

            prev_outs = None
            if kernel.previous_out is not None:
                first = kernel.previous_out(carry_start)
                prev_outs = jax.tree.map(lambda f, o: jnp.concatenate([f[None], o[:-1]]), first, outs)

            def step_fn(slots, inputs):
                j, (out, prev_out, r, ct_out) = inputs
                slots, local, record = _adjoint_step(
                    kernel, params, consts, out, prev_out, r, slots, ct_out, t0 + j, trunc, clip_norm, diagnostics
                )
                return slots, (local, record)

            slots, (locals_, record) = lax.scan(
                step_fn, slots, (jnp.arange(block), (outs, prev_outs, res, ct_outs)), reverse=True, unroll=unroll
            )
            x_leaves, x_tree = jax.tree.flatten(xs_block)

            def project(p, float_leaves):
                it = iter(float_leaves)
                return kernel.project(p, x_tree.unflatten([next(it) if d else x for x, d in zip(x_leaves, x_diff)]))

            us, project_vjp = jax.vjp(project, params, [x for x, d in zip(x_leaves, x_diff) if d])
            dp_core, dus = kernel.grads(params, consts, carry_start, us, outs, prev_outs, res, locals_)
            dp_proj, dx = project_vjp(dus)
            acc = _add(_add(_add(acc, dp_post), dp_core), dp_proj)
            return (slots, acc), (dx, record)

        (slots, acc), (dx, record) = lax.scan(
            block_fn, (slots, acc), (jnp.arange(count), saved[g]), reverse=True
        )
        dx_groups.insert(0, dx)
        diag_groups.insert(0, record)

    dcarry = jax.tree.map(lambda s: jnp.sum(s, axis=0), slots)
    dxs = None
    if need_xs:
        dx_it = iter(_concat_time(dx_groups))
        dxs = jax.tree.map(
            lambda x: next(dx_it) if is_float(x) else np.zeros(x.shape, jax.dtypes.float0), xs
        )
    diag = Diagnostics(*_concat_time(diag_groups)) if diagnostics else None
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


def setup(step, params, carry, xs):
    """The kernel of `step` and its loop invariants for one call."""
    x_first = jax.tree.map(lambda a: a[:1], xs)
    kernel = kernel_for(step, params, carry, jax.tree.map(lambda a: a[0], x_first))
    u_first = jax.tree.map(lambda a: a[0], kernel.project(params, x_first))
    return kernel, kernel.prepare(params, carry, u_first)
