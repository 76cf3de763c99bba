"""The gradient options of one call: checked in one place (`check_options`), then resolved once,
for a sequence of known length, into one `Options` record that every method reads.

`Options` is a pytree whose only leaves are the two options that may be traced arrays (a chunk
length or a clipping threshold vmapped over, say); everything else is static metadata. So one
record passes through `jit`, `vmap` and the custom VJP of `unroll` as an ordinary argument.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp

from .. import _validate as v
from .._engine.remat import canonical_remat, validate_remat
from .._types import PyTree
from . import layout


@functools.partial(jax.tree_util.register_dataclass, data_fields=["k"],
                   meta_fields=["chunk_length", "window_length", "adjoints", "active"])
@dataclasses.dataclass(frozen=True)
class Truncation:
    """The truncation of one call, resolved for its sequence length.

    Chunked truncation (`truncation=k`) is the case `chunk == window`; Williams-Peng windows
    (`truncation=(k1, k2)`) run `adjoints = ceil(k2 / k1)` carry adjoints at once. Exact BPTT, and any
    truncation that cuts nowhere on this length, is `active=False`.
    """

    k: Any = None  # a traced chunk length (clamped to T), else None
    chunk_length: Optional[int] = 1  # static k1 (None when `k` is traced)
    window_length: Optional[int] = 1  # static k2 (None when `k` is traced)
    adjoints: int = 1  # carry adjoints alive at once in the reverse loop
    active: bool = False

    @property
    def chunk(self):
        """k1, possibly traced."""
        return self.k if self.k is not None else self.chunk_length

    @property
    def window(self):
        """k2, possibly traced."""
        return self.k if self.k is not None else self.window_length

    @property
    def windows(self) -> bool:
        """Williams-Peng windows longer than their chunks (several adjoints per step)."""
        return self.active and self.k is None and self.window_length != self.chunk_length


EXACT = Truncation()


def resolve_truncation(truncation, length: int) -> Truncation:
    """The `Truncation` of a checked `truncation` option on a sequence of `length` steps."""
    truncation = v.static_truncation(truncation)
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
        return Truncation(None, k1, k2, min(math.ceil(k2 / k1), chunks), True)
    if isinstance(truncation, int):
        return EXACT if truncation >= length else Truncation(None, truncation, truncation, 1, True)
    # A traced chunk length: any k >= T is exact BPTT, and clamping keeps the loop's `t + k` far
    # from integer overflow.
    return Truncation(jnp.minimum(truncation, length), None, None, 1, True)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["truncation", "clip_norm"],
    meta_fields=["remat", "clip_scope", "diagnostics", "unroll", "check_finite", "axis_name", "need_xs"],
)
@dataclasses.dataclass(frozen=True)
class Options:
    """One call's resolved gradient options (see `jaxbptt.value_and_grad` for their meaning)."""

    truncation: Truncation = EXACT
    clip_norm: Any = None  # None, or the per-step clipping threshold as a scalar array (may be traced)
    remat: Any = None  # the memory policy: None, or an `Every`, `Sqrt` or `Binomial` value
    clip_scope: str = "batch"  # "batch" or "example"
    diagnostics: bool = False  # record per-step adjoint norms and clipped flags
    unroll: Any = 1  # steps per iteration of the inner loops (True: the whole loop), as lax.scan takes it
    check_finite: bool = False  # checkify every forward and backward value
    axis_name: Any = None  # mapped axis over which clipping and diagnostic norms are reduced
    need_xs: bool = True  # form the gradients of `xs`

    def used(self) -> dict:
        """The options that change the computation from plain exact BPTT, by name (for messages)."""
        named = {"truncation": self.truncation.active, "clip_norm": self.clip_norm is not None,
                 "remat": self.remat is not None, "diagnostics": self.diagnostics,
                 "check_finite": self.check_finite, "axis_name": self.axis_name is not None}
        return {name: getattr(self, name) for name, on in named.items() if on}


def check_options(*, truncation=None, remat=None, clip_norm=None, clip_scope="batch", unroll=1, time_axis=0,
                  has_aux=False, diagnostics=False, check_finite=False, argnums=0, final_loss=None) -> None:
    """Trace-time validation of every option a public function takes (each is checked here only)."""
    v.check_truncation(truncation)
    validate_remat(remat)
    v.check_clip_norm(clip_norm)
    layout.check_clip_scope(clip_scope)
    layout.check_time_axis(time_axis)
    v.check_argnums(argnums)
    if not isinstance(unroll, int) or (not isinstance(unroll, bool) and unroll < 0):
        raise ValueError(f"unroll must be a positive int (steps per loop iteration), or as in lax.scan True or 0 for "
                         f"the whole loop and False for 1; got unroll={unroll!r}.")
    for name, flag in (("has_aux", has_aux), ("diagnostics", diagnostics), ("check_finite", check_finite)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool; got {name}={flag!r}.")
    if final_loss is not None:
        v.check_callable("final_loss", final_loss)


def resolve(length: int, *, truncation=None, clip_norm=None, remat=None, unroll=1, **static) -> Options:
    """The `Options` of a call on `length` steps; `static` are the other fields of `Options`."""
    clip = None if clip_norm is None else jnp.asarray(clip_norm)
    unroll = True if unroll is True or (unroll == 0 and not isinstance(unroll, bool)) else max(int(unroll), 1)
    return Options(truncation=resolve_truncation(truncation, length), clip_norm=clip, remat=canonical_remat(remat),
                   unroll=unroll, **static)


def invalid(opts: Options):
    """False where a traced option is out of range (which cannot be checked at trace time); None when
    no option is traced."""
    ok = None
    if opts.truncation.k is not None:
        ok = opts.truncation.k >= 1
    if opts.clip_norm is not None and v.is_traced(opts.clip_norm):
        good = (opts.clip_norm > 0) & jnp.isfinite(opts.clip_norm)
        ok = good if ok is None else ok & good
    return None if ok is None else ~ok


def poison_invalid(grads: PyTree, opts: Options) -> PyTree:
    """Traced options cannot be checked at trace time: out-of-range values give NaN gradients."""
    bad = invalid(opts)
    if bad is None:
        return grads
    return jax.tree.map(lambda g: g if g.dtype == jax.dtypes.float0 else jnp.where(bad, jnp.nan, g).astype(g.dtype),
                        grads)
