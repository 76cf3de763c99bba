"""A recurrence split over time across devices: what crosses from one device's slice to the next.

Inside `jax.shard_map` with time split over a mesh axis, each device holds a contiguous slice of
the sequence, in the order of its index along that axis. A linear recurrence
`h_t = A_t h_{t-1} + b_t` then needs only one number per device from the others: the state
entering its slice. Each device runs its slice from zero, which gives the slice's end state `e_k`
and the product `P_k` of its decays; one all-gather exchanges the pairs, and a short serial pass
over the devices, `x_{k+1} = P_k x_k + e_k` from the sequence's initial state, gives every device
its entering state (Blelloch's two-level scan with the devices as the upper level; recurrentgemma
does the same for its RG-LRU). The adjoint recurrence runs the other way with the same products,
so the backward pass exchanges the same way, from the last slice to the first.

This module holds those cross-device pieces, shared by `linear_scan`, the cells' `parallel` forms
and `deer`; the scans inside each slice belong to their callers.
"""

from __future__ import annotations

from typing import Callable, Hashable

import jax
import jax.numpy as jnp
from jax import lax


def axis_size(caller: str, axis_name: Hashable) -> int:
    """The number of devices along `axis_name`, or a ValueError saying where `caller` must run."""
    try:
        return lax.axis_size(axis_name)
    except NameError:
        raise ValueError(
            f"{caller}: axis_name {axis_name!r} is not a bound axis name here. Call {caller} inside "
            f"jax.shard_map over a mesh with an axis {axis_name!r} (time split over it, in_specs "
            f"P({axis_name!r}) for time-major arrays), or pass axis_name=None for one device."
        ) from None


def match_varying(*leaves):
    """`leaves` cast to vary over the same manual mesh axes (those of `jax.shard_map` that any of them
    varies over), so that a custom VJP over them may return cotangents that vary as its outputs do.

    A decay or an initial state replicated across the devices feeds a result that differs per
    device; JAX's own rules insert this cast for ordinary operations, and transpose it into the sum
    over devices that the replicated input's gradient needs. Outside `shard_map`, a no-op."""
    varying = [_varying_axes(x) for x in leaves]
    union = frozenset().union(*varying)
    return tuple(lax.pcast(x, tuple(union - v), to="varying") if union - v else x for x, v in zip(leaves, varying))


def _varying_axes(x) -> frozenset:
    aval = jax.typeof(x)
    mat = getattr(aval, "mat", None)  # JAX 0.10; before it, `vma`
    return mat.varying if mat is not None else getattr(aval, "vma", frozenset())


def first_device(axis_name: Hashable, reverse: bool) -> jax.Array:
    """Whether this device holds the slice the recurrence runs through first."""
    last = lax.axis_size(axis_name) - 1
    return lax.axis_index(axis_name) == (last if reverse else 0)


def carry_across(end, product, h0, axis_name: Hashable, reverse: bool, apply: Callable):
    """The state entering this device's slice of `x_t = A_t x_{t-1} + b_t`, and the state after
    the last slice.

    Args:
      end: this slice's end state run from zero.
      product: the product of this slice's decays (`apply(product, x)` applies it to a state).
      h0: the state before the first slice, read on the device that holds it (the first device along
        the axis, the last with `reverse`); None for zero, as in an adjoint pass.
      reverse: the recurrence runs from the last device's slice to the first.
    """
    if h0 is None:
        ends, products = lax.all_gather((end, product), axis_name)
        start = jnp.zeros_like(end)
    else:
        ends, products, h0s = lax.all_gather((end, product, h0), axis_name)
        start = h0s[-1 if reverse else 0]

    def over(x, pe):
        return apply(pe[0], x) + pe[1], x

    final, entering = lax.scan(over, start, (products, ends), reverse=reverse)
    return lax.dynamic_index_in_dim(entering, lax.axis_index(axis_name), keepdims=False), final


def last_on_every_device(x, axis_name: Hashable):
    """The value of `x` on the last device along `axis_name`, on every device (its gradient flows
    back to that device alone)."""
    last = lax.axis_index(axis_name) == lax.axis_size(axis_name) - 1
    return lax.psum(jnp.where(last, x, jnp.zeros_like(x)), axis_name)


def shift(x, fill, *, toward_start: bool, axis_name: Hashable | None = None):
    """`x` (time leading) moved one step along time, `fill` (shaped like one step) entering at the
    vacated end of the whole sequence.

    With `axis_name`, `x` is this device's slice of a sequence split over that axis: the step that
    crosses a slice boundary comes from the neighbouring device (one `ppermute` of one step).
    """
    if axis_name is not None:
        n = lax.axis_size(axis_name)
        index = lax.axis_index(axis_name)
        if toward_start:  # this slice's first step goes to the previous device's end
            boundary, pairs, edge = x[0], [(i, i - 1) for i in range(1, n)], n - 1
        else:
            boundary, pairs, edge = x[-1], [(i, i + 1) for i in range(n - 1)], 0
        fill = jnp.where(index == edge, fill, lax.ppermute(boundary, axis_name, pairs))
    if toward_start:
        return jnp.concatenate([x[1:], fill[None]])
    return jnp.concatenate([fill[None], x[:-1]])
