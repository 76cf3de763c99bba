"""`bidirectional`: a forward and a reversed unroll over the same inputs, their outputs merged."""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from .._types import PyTree, StepFn
from .._core.api import unroll


def concat_features(y_forward, y_backward):
    """The default merge: concatenate the two directions' outputs on their last axis."""
    return jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=-1), y_forward, y_backward)


def bidirectional(
    forward_step: StepFn,
    backward_step: StepFn,
    params: tuple[PyTree, PyTree],
    carries: tuple[PyTree, PyTree],
    xs: PyTree,
    *,
    merge: Optional[Callable] = None,
    **options,
) -> tuple[tuple[PyTree, PyTree], PyTree]:
    """Run `forward_step` over `xs` from the first step and `backward_step` from the last, and merge.

    Both directions are `jaxbptt.unroll` calls, so `jax.grad` goes through two hand-written reverse
    scans, and `options` (truncation, clip_norm, remat, unroll) apply to both. The output at step t
    is `merge(y_forward_t, y_backward_t)`, where the backward direction's y_t has seen steps
    t .. T - 1.

    Args:
      forward_step, backward_step: the two directions' steps (the same function twice is fine).
      params: `(forward_params, backward_params)`.
      carries: `(forward_initial_carry, backward_initial_carry)`.
      xs: time-major inputs.
      merge: `merge(y_forward, y_backward) -> y` on the stacked outputs; default: concatenate along
        the last axis.

    Returns:
      `((forward_final_carry, backward_final_carry), ys)`.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxbptt as jb
      >>> fwd, bwd = jb.gru(8), jb.gru(8)
      >>> params = (fwd.init(jax.random.key(0), 3), bwd.init(jax.random.key(1), 3))
      >>> carries = (fwd.initial_carry((2,)), bwd.initial_carry((2,)))
      >>> finals, ys = jb.bidirectional(fwd.step, bwd.step, params, carries, jnp.ones((10, 2, 3), jnp.float32))
      >>> ys.shape
      (10, 2, 16)
    """
    if "probe" in options:
        raise TypeError(
            "bidirectional does not take probe= (the two directions would add their diagnostics together); "
            "to get each direction's diagnostics, call jaxbptt.unroll for each direction with its own probe "
            "(reverse=True for the backward one)."
        )
    for name, value in (("params", params), ("carries", carries)):
        if not isinstance(value, (tuple, list)) or len(value) != 2:
            raise ValueError(f"bidirectional needs {name} as a pair (forward, backward); got {type(value).__name__}"
                             + (f" of length {len(value)}." if isinstance(value, (tuple, list)) else "."))
    final_f, ys_f = unroll(forward_step, params[0], carries[0], xs, **options)
    final_b, ys_b = unroll(backward_step, params[1], carries[1], xs, reverse=True, **options)
    return (final_f, final_b), (merge or concat_features)(ys_f, ys_b)
