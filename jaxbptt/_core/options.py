"""The gradient options of one call: validated first (`check_options`), then resolved once per call,
for a sequence of known length, into one `Options` record that the engine reads everywhere.

`Options` is a pytree whose only leaves are the two options that may be traced arrays (a chunk
length or a clipping threshold vmapped over, say); every other field is static metadata. So one
record can pass through `jit`, `vmap` and the custom VJP of `unroll` as an ordinary argument.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from .. import _validate as v
from .._engine.remat import validate_remat
from .._engine.reverse import EXACT, Truncation, truncation_spec
from .._types import PyTree


def check_options(truncation, remat, clip_norm, unroll) -> None:
    """Trace-time validation of the options `unroll` and `value_and_grad` share."""
    v.check_truncation(truncation)
    validate_remat(remat)
    v.check_clip_norm(clip_norm)
    if isinstance(unroll, bool) or not isinstance(unroll, int) or unroll < 1:
        raise ValueError(f"unroll must be a positive int (steps per loop iteration, as in lax.scan); got unroll={unroll!r}.")


_TRACEABLE = ("k", "clip_norm")


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=list(_TRACEABLE),
    meta_fields=["layout", "static_truncation", "remat", "clip_scope", "diagnostics", "unroll", "check_finite",
                 "axis_name", "need_xs", "engine"],
)
@dataclasses.dataclass(frozen=True)
class Options:
    """One call's resolved gradient options (see `jaxbptt.unroll` and `jaxbptt.value_and_grad`)."""

    k: Any = None  # a traced chunk length (`truncation=k`), clamped to T; None when static or unused
    clip_norm: Any = None  # None, or the per-step clipping threshold as a scalar array (may be traced)
    layout: Truncation = EXACT  # the reverse loop's truncation layout; k1 and k2 are None when `k` is set
    static_truncation: bool = True  # truncation None or a Python int (what the autodiff path accepts)
    remat: Any = None  # the memory policy, validated
    clip_scope: str = "batch"  # "batch" or "example"
    diagnostics: bool = False  # record per-step adjoint norms and clipped flags (also for a probe)
    unroll: int = 1  # steps per iteration of the inner loops
    check_finite: bool = False  # checkify every forward and backward value
    axis_name: Any = None  # mapped axis over which clipping and diagnostic norms are reduced
    need_xs: bool = True  # form the gradients of `xs`
    engine: str = "auto"  # "auto", "reverse" or "autodiff" (see `_path`)

    @property
    def trunc(self) -> Truncation:
        """The truncation layout with a traced chunk length in place."""
        return self.layout if self.k is None else self.layout._replace(k1=self.k, k2=self.k)


def resolve(length: int, *, truncation=None, clip_norm=None, **static) -> Options:
    """The `Options` of a call on `length` steps; `static` are the other fields of `Options`."""
    truncation = v.static_truncation(truncation)
    layout, k = truncation_spec(truncation, length), None
    if layout.active and v.is_traced(truncation):
        # Any k >= T is exact BPTT; clamping keeps the loop's `t + k` far from integer overflow.
        layout, k = layout._replace(k1=None, k2=None), jnp.minimum(truncation, length)
    static_truncation = truncation is None or (isinstance(truncation, int) and not isinstance(truncation, bool))
    clip = None if clip_norm is None else jnp.asarray(clip_norm)
    return Options(k=k, clip_norm=clip, layout=layout, static_truncation=static_truncation, **static)


def poison_invalid(grads: PyTree, opts: Options) -> PyTree:
    """Traced options cannot be checked at trace time: out-of-range values give NaN gradients."""
    ok = True
    if opts.k is not None:
        ok = ok & (opts.k >= 1)
    if opts.clip_norm is not None:
        ok = ok & (opts.clip_norm > 0) & jnp.isfinite(opts.clip_norm)
    if ok is True:
        return grads
    return jax.tree.map(lambda g: g if g.dtype == jax.dtypes.float0 else jnp.where(ok, g, jnp.nan).astype(g.dtype), grads)
