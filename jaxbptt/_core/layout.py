"""Data layout and scope options shared by the public functions: `time_axis` (time-major or
batch-major data), `clip_scope` (one clipping norm for the whole batch or one per example), and the
`(loss_t, aux_t)` convention of `has_aux` losses."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .._types import PyTree

CLIP_SCOPES = ("batch", "example")


def check_time_axis(time_axis) -> None:
    if isinstance(time_axis, bool) or time_axis not in (0, 1):
        raise ValueError(
            f"time_axis must be 0 (time-major data, shaped (T, batch, ...)) or 1 (batch-major data, shaped "
            f"(batch, T, ...), Flax's default); got time_axis={time_axis!r}."
        )


def time_major(tree: PyTree, time_axis: int, name: str = "xs") -> PyTree:
    """`tree` with time moved to the leading axis. Under `jit` the transpose is usually fused into
    its consumers (the input projection), so no copy is materialised where XLA allows."""
    if time_axis == 0:
        return tree
    for keypath, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if np.ndim(leaf) < 2:
            raise ValueError(
                f"time_axis=1 needs every leaf of {name} shaped (batch, T, ...); {name}"
                f"{jax.tree_util.keystr(keypath)} has shape {np.shape(leaf)}."
            )
    return jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1), tree)


def from_time_major(tree: PyTree, time_axis: int) -> PyTree:
    """The inverse of `time_major` for results stacked over time (outputs, input gradients)."""
    if time_axis == 0 or tree is None:
        return tree
    return jax.tree.map(lambda a: a if np.ndim(a) < 2 else jnp.swapaxes(a, 0, 1), tree)


def check_clip_scope(clip_scope) -> None:
    if clip_scope not in CLIP_SCOPES:
        raise ValueError(
            f"clip_scope must be 'batch' (one norm over the whole carry cotangent) or 'example' (one norm "
            f"per row of the carry's leading batch axis); got clip_scope={clip_scope!r}."
        )


def check_example_rows(carry: PyTree) -> None:
    """`clip_scope="example"` needs a leading batch axis of one size on every carry leaf."""
    sizes = {jax.tree_util.keystr(k): np.shape(c)[0] if np.ndim(c) else None
             for k, c in jax.tree_util.tree_leaves_with_path(carry)}
    if None in sizes.values() or len(set(sizes.values())) > 1:
        listing = ", ".join(f"carry{k}: {v if v is not None else 'scalar'}" for k, v in sizes.items())
        raise ValueError(
            "clip_scope='example' needs every carry leaf to have the same leading batch axis (one row per "
            f"example); got leading sizes {listing}."
        )


def split_aux(loss_fn):
    """`loss_fn(y, t) -> (loss_t, aux_t)` as its scalar loss part, checking the pair structure."""

    def scalar_loss(y, t):
        out = loss_fn(y, t)
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise TypeError(
                "with has_aux=True, loss_fn(y_t, target_t) must return a pair (loss_t, aux_t); got "
                f"{type(out).__name__}" + (f" of length {len(out)}." if isinstance(out, (tuple, list)) else ".")
            )
        return out[0]

    return scalar_loss
