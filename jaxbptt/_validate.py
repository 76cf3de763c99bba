"""Trace-time checks shared by the public functions. Each error names the argument, what it got and
what it expected, in the style of `lax.scan`'s carry errors."""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ._types import PyTree


def _path(name: str, keypath) -> str:
    return name + jax.tree_util.keystr(keypath)


def _aval(x) -> str:
    return f"{jnp.dtype(x.dtype).name}{list(x.shape)}".replace(" ", "")


def is_traced(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def check_callable(name: str, fn) -> None:
    if not callable(fn):
        raise TypeError(f"{name} must be callable as {name}(...); got {fn!r} of type {type(fn).__name__}.")


def time_length(name: str, tree: PyTree) -> int:
    """The common leading (time) axis length of every leaf of `tree`."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    if not leaves:
        raise ValueError(f"{name} must hold at least one array with time as its leading axis; got {tree!r}.")
    lengths = {}
    for keypath, leaf in leaves:
        shape = np.shape(leaf)
        if len(shape) == 0:
            raise ValueError(
                f"{name} must have time as the leading axis of every leaf, but {_path(name, keypath)} is a "
                f"scalar. Stack per-step values along axis 0 (time-major, as lax.scan)."
            )
        lengths[_path(name, keypath)] = shape[0]
    if len(set(lengths.values())) > 1:
        listing = ", ".join(f"{k}: {v}" for k, v in lengths.items())
        raise ValueError(f"every leaf of {name} must share the leading (time) axis length; got {listing}.")
    return next(iter(lengths.values()))


def check_same_length(name: str, tree: PyTree, length: int, reference: str = "xs") -> None:
    got = time_length(name, tree)
    if got != length:
        raise ValueError(
            f"{name} must have the same leading (time) axis length as {reference}: {reference} has "
            f"{length} steps but {name} has {got}."
        )


def first_step(tree: PyTree) -> PyTree:
    """Abstract values of one step of a time-major tree."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a)[1:], jnp.result_type(a)), tree)


def check_carry(step: Callable, params: PyTree, carry: PyTree, xs: PyTree) -> PyTree:
    """Check that `step` keeps the carry's structure, shapes and dtypes; return the carry as arrays.

    A weakly typed initial carry leaf (a Python scalar) takes the dtype that the step returns, as in
    `lax.scan`.
    """
    carry = jax.tree.map(jnp.asarray, carry)
    try:
        new_carry, _ = jax.eval_shape(step, params, carry, first_step(xs))
    except (TypeError, ValueError) as err:
        if "cannot unpack" in str(err) or "not enough values" in str(err) or "too many values" in str(err):
            raise TypeError(
                "step must return a pair (carry, y) as step(params, carry, x) -> (carry, y); "
                f"calling it raised: {err}"
            ) from err
        raise
    in_struct, out_struct = jax.tree.structure(carry), jax.tree.structure(new_carry)
    if in_struct != out_struct:
        raise TypeError(
            "step must return a carry with the same pytree structure as the input carry; the input "
            f"carry has structure {in_struct} but step returned {out_struct}."
        )
    problems, fixed = [], []
    for (keypath, c), n in zip(jax.tree_util.tree_leaves_with_path(carry), jax.tree.leaves(new_carry)):
        where = _path("carry", keypath)
        if c.shape != n.shape or (c.dtype != n.dtype and not (c.weak_type and c.shape == n.shape)):
            problems.append(
                f"the input carry component {where} has type {_aval(c)} but the corresponding output "
                f"carry component has type {_aval(n)}"
            )
        fixed.append(c.astype(n.dtype) if c.dtype != n.dtype else c)
    if problems:
        raise TypeError(
            "step must return a carry of the same shapes and dtypes as the input carry, but "
            + "; ".join(problems)
            + ". Make the initial carry match what step returns (e.g. with .astype)."
        )
    return jax.tree.unflatten(in_struct, fixed)


def check_loss(loss_fn: Callable, *args, call: str = "loss_fn(y_t, target_t)", what: str = "the loss of one step"):
    """`loss_fn(*args)` must be a float scalar; returns its abstract value."""
    out = jax.eval_shape(loss_fn, *args)
    if not hasattr(out, "shape") or out.shape != () or not jnp.issubdtype(out.dtype, jnp.floating):
        raise ValueError(f"{call} must return a float scalar ({what}); got {jax.tree.map(_aval, out)}.")
    return out


def check_truncation(truncation) -> None:
    """None, a positive int (or a traced integer scalar), or a pair (k1, k2) with 1 <= k1 <= k2."""
    if truncation is None:
        return
    if isinstance(truncation, tuple):
        if len(truncation) != 2 or not all(isinstance(k, int) and not isinstance(k, bool) for k in truncation):
            raise TypeError(f"truncation=(k1, k2) must be a pair of Python ints; got truncation={truncation!r}.")
        k1, k2 = truncation
        if k1 < 1 or k2 < k1:
            raise ValueError(
                f"truncation=(k1, k2) needs 1 <= k1 <= k2 (k1 steps per chunk, a window of k2 steps); "
                f"got truncation={truncation!r}."
            )
        return
    if isinstance(truncation, bool):
        raise TypeError(f"truncation must be None, an int k >= 1 or a pair (k1, k2); got truncation={truncation!r}.")
    if isinstance(truncation, int):
        if truncation < 1:
            raise ValueError(f"truncation must be an int k >= 1 (the chunk length); got truncation={truncation}.")
        return
    if hasattr(truncation, "dtype") and hasattr(truncation, "shape"):
        if not jnp.issubdtype(truncation.dtype, jnp.integer) or np.shape(truncation) != ():
            raise TypeError(
                f"truncation as an array must be an integer scalar; got {_aval(truncation)}."
            )
        if not is_traced(truncation) and int(truncation) < 1:
            raise ValueError(f"truncation must be an int k >= 1 (the chunk length); got truncation={int(truncation)}.")
        return
    raise TypeError(
        f"truncation must be None, an int k >= 1 or a pair (k1, k2); got {truncation!r} of type "
        f"{type(truncation).__name__}."
    )


def static_truncation(truncation):
    """A concrete truncation as Python ints (so it sizes the loop statically), else as given."""
    if hasattr(truncation, "dtype") and not is_traced(truncation):
        return int(truncation)
    return truncation


def check_clip_norm(clip_norm) -> None:
    if clip_norm is None:
        return
    if isinstance(clip_norm, bool) or not (
        isinstance(clip_norm, (int, float)) or (hasattr(clip_norm, "dtype") and np.shape(clip_norm) == ())
    ):
        raise TypeError(f"clip_norm must be None or a float > 0; got {clip_norm!r} of type {type(clip_norm).__name__}.")
    if is_traced(clip_norm):
        return
    value = float(clip_norm)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"clip_norm must be a finite float > 0 (the largest per-step carry-cotangent norm); got clip_norm={value}.")


def check_argnums(argnums) -> tuple[int, ...]:
    nums = (argnums,) if isinstance(argnums, int) else argnums
    if not isinstance(nums, tuple) or not nums or any(
        isinstance(a, bool) or not isinstance(a, int) or a not in (0, 1, 2) for a in nums
    ) or len(set(nums)) != len(nums):
        raise ValueError(
            f"argnums must be an int or a tuple of distinct ints among 0 (params), 1 (carry), 2 (xs); "
            f"got argnums={argnums!r}."
        )
    return nums


def check_differentiable(name: str, tree: PyTree) -> None:
    for keypath, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            raise TypeError(
                f"cannot differentiate with respect to {name}: {_path(name, keypath)} has dtype "
                f"{jnp.result_type(leaf).name}, not a float dtype. Drop it from argnums or make it a float."
            )


class _Written(str):
    """A string that `repr` writes as it is (an array leaf's `dtype[shape]` inside a container's repr)."""

    __repr__ = str.__str__


def describe(tree: PyTree) -> str:
    """`tree` for an error message: its containers as Python writes them, each array as `dtype[shape]`,
    e.g. `(float32[12,8,2], Targets(value=float32[12,8,1], weight=float32[12,8,1]))`."""
    written = jax.tree.map(lambda a: _Written(_aval(a)) if hasattr(a, "shape") and hasattr(a, "dtype") else a, tree)
    return repr(written)
