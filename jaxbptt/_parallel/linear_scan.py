"""`linear_scan`: the elementwise linear recurrence `h_t = a_t * h_{t-1} + b_t`, vectorised over time.

Three algorithms, all exact:

- associative: the pairs `(a_t, b_t)` compose associatively,
  `(a1, b1) then (a2, b2) = (a2 a1, a2 b1 + b2)`, so `lax.associative_scan` computes every `h_t` in
  O(log T) depth. Right for GPUs and TPUs; on a CPU its ~2 log2(T) passes over the whole
  (T, ...) array make it memory-bound and slower than a sequential loop.
- chunked (two-level): time is cut into C chunks of L ~ sqrt(T)/2 steps; one loop over the L
  positions, vectorised over the chunks, gives each chunk's end state from zero and the product of
  its decays, a short sequential scan over the C chunks gives each chunk's true initial state, and a
  second loop over the L positions writes the states: 2L loop iterations instead of T, each over C
  steps' data, at the price of reading the inputs twice.
- sequential: one `lax.scan` over time. The CPU default: there the recurrence is bound by memory
  bandwidth, and one pass over each array beats the chunked scan's extra reads (measured at B=8,
  H=256 on 2 cores: forward + backward 1.3-1.4x faster than `jax.grad` through `lax.scan`, against
  1.0-1.1x for the chunked scan, in CPU time).

Either way the gradient is hand-written: the adjoint of a linear recurrence is the same recurrence
run the other way,

    lambda_t = g_t + a_{t+1} lambda_{t+1},   dL/db_t = lambda_t,   dL/da_t = lambda_t h_{t-1},

so the backward pass is one scan of the same kind whose residuals are `a`, the states and `h0`
(JAX's autodiff of `associative_scan` would instead keep the intermediate tree of the forward scan
and transpose it level by level; its autodiff of the loops would store every step's carry).

Split over devices along time (`axis_name`, inside `jax.shard_map`), each device first runs its
slice from zero for the slice's end state and decay product, by the same method but keeping no
states; `time_sharding.carry_across` turns the devices' pairs into each slice's entering state, and
the slice is scanned again from it. The backward pass does the same with the adjoint recurrence,
from the last slice to the first, and then runs the slice's adjoint scan with the cotangent that
arrives from the later slices.

The associative and chunked methods (and a split over devices) multiply decays into products over
whole stretches of steps, which the sequential loop never forms. A product with an exactly zero
decay is kept zero even when the rest of the stretch overflows (`_mul`), as the loop's state is
zeroed by that step; a product that overflows and meets a non-zero state gives inf where the loop
may stay finite, so those methods need products of consecutive decays within the float range
(always so for |a| <= 1).
"""

from __future__ import annotations

import functools
import math
from typing import Hashable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .. import _validate as v
from .._types import PyTree
from . import time_sharding
from .time_sharding import shift


def _mul(x, y):
    """`x * y`, but exactly zero where a factor is zero and the other is not NaN: a zero decay
    forgets the past exactly, even when a product of the steps it forgets has overflowed to inf."""
    forgets = ((x == 0) & ~jnp.isnan(y)) | ((y == 0) & ~jnp.isnan(x))
    product = x * y
    return jnp.where(forgets, jnp.zeros_like(product), product)


def _combine(earlier, later):
    a1, b1 = earlier
    a2, b2 = later
    return _mul(a2, a1), _mul(a2, b1) + b2


def _affine(adjoint: bool):
    """One step of the recurrence (`x <- a x + b`) or of its adjoint run against it
    (`c <- a (c + g)`, `c` the cotangent of the state before the step); either is affine in the
    carried value with slope `a`."""
    if adjoint:
        return lambda c, ag: ag[0] * (c + ag[1])
    return lambda h, ab: ab[0] * h + ab[1]


def _carry(x, product_end):
    """A whole stretch as one step: `x <- P x + e`."""
    return _mul(product_end[0], x) + product_end[1]


def _associative(a, b, h0, reverse: bool):
    """One leaf: `a`, `b` of shape (T, ...) and `h0` of shape (...), all of one dtype."""
    first = -1 if reverse else 0
    b = jnp.asarray(b).at[first].add(a[first] * h0)
    return lax.associative_scan(_combine, (a, b), reverse=reverse)[1]


def _sequential(a, b, h0, reverse: bool):
    advance = _affine(False)

    def step(h, ab):
        h = advance(h, ab)
        return h, h

    return lax.scan(step, h0, (a, b), reverse=reverse)[1]


# ------------------------------------------------------------------------------- the chunked scan


def _chunk_length(length: int) -> int:
    """Steps per chunk: about sqrt(T) / 2 (measured fastest on CPU), a divisor of T when one lies
    within a factor of two of that, so that no padding has to be copied in."""
    target = max(1, round(math.sqrt(length) / 2))
    for chunk in range(target, (target + 1) // 2 - 1, -1):
        if length % chunk == 0:
            return chunk
    return target


def _chunks(x, chunk: int, fill: float):
    """(T, ...) -> (C, L, ...), padded at the end by `fill` steps (a=1, b=0: identity steps)."""
    pad = -x.shape[0] % chunk
    if pad:
        x = jnp.concatenate([x, jnp.full((pad,) + x.shape[1:], fill, x.dtype)])
    return x.reshape((x.shape[0] // chunk, chunk) + x.shape[1:])


def _unchunk(x, length: int):
    return x.reshape((-1,) + x.shape[2:])[:length]


def _at(x, position):
    return lax.dynamic_index_in_dim(x, position, 1, keepdims=False)


def _chunk_ends(xs, reverse: bool, advance):
    """Every chunk run from zero at once (a loop over the L positions, vectorised over the C
    chunks of the (C, L, ...) arrays `xs`): each chunk's end state and the product of its slopes
    `xs[0]`, both (C, ...)."""
    length = xs[0].shape[1]
    position = (lambda i: length - 1 - i) if reverse else (lambda i: i)

    def local(i, state):
        x, slope = state
        xs_l = tuple(_at(v, position(i)) for v in xs)
        return advance(x, xs_l), _mul(slope, xs_l[0])

    zero = jnp.zeros_like(_at(xs[1], 0))  # zeros_like: inside shard_map, varying as the data are
    return lax.fori_loop(0, length, local, (zero, jnp.ones_like(zero)))


def _two_level(xs, x0, reverse: bool, advance, emit, outputs: int):
    """Carry `x` through chunked steps in two passes; `xs` is a tuple of (C, L, ...) arrays, `xs[0]`
    the slopes.

    `advance(x, xs_l)` is one step, affine in `x` with slope `xs_l[0]`; `emit(x, l, xs_l)` is the
    same step returning `(x', outs)`, `outputs` arrays shaped like one position. Pass 1 runs every
    chunk from zero at once (a loop over the L positions, vectorised over the C chunks) for its
    local end state and the product of its slopes; a short scan over the chunks turns those into
    each chunk's entering carry; pass 2 reruns the L positions from the entering carries, writing
    the outputs. Returns (outputs as (C, L, ...) arrays, entering carries (C, ...), final carry).
    """
    num, length = xs[0].shape[:2]
    position = (lambda i: length - 1 - i) if reverse else (lambda i: i)
    if num == 1:
        entering = x0[None]
    else:
        ends, slopes = _chunk_ends(xs, reverse, advance)
        _, entering = lax.scan(lambda x, se: (_carry(x, se), x), x0, (slopes, ends), reverse=reverse)

    def rerun(i, state):
        x, outs = state
        l = position(i)
        x, new = emit(x, l, tuple(_at(v, l) for v in xs))
        return x, tuple(lax.dynamic_update_index_in_dim(o, n, l, 1) for o, n in zip(outs, new))

    # fresh output buffers: writing over the inputs instead makes XLA copy them every iteration
    blank = tuple(jnp.zeros_like(xs[0], x0.dtype) for _ in range(outputs))
    last, outs = lax.fori_loop(0, length, rerun, (entering, blank))
    return outs, entering, last[0 if reverse else -1]


def _chunked_forward(a, b, h0, reverse: bool):
    chunk = _chunk_length(b.shape[0])
    a_c, b_c = _chunks(a, chunk, 1.0), _chunks(b, chunk, 0.0)

    advance = _affine(False)

    def emit(h, l, ab):
        h = advance(h, ab)
        return h, (h,)

    (hs_c,), entering, _ = _two_level((a_c, b_c), h0, reverse, advance, emit, 1)
    return _unchunk(hs_c, b.shape[0]), (a_c, hs_c, entering)


def _chunked_adjoint(residuals, g, reverse: bool, incoming):
    """The VJP of `_chunked_forward`: `lambda_t = g_t + c`, `c <- a_t lambda_t` run against the
    forward direction from `c = incoming` (so `c` is `a_next * lambda_next` and no shifted copy of
    `a` is made), with `dL/da_t = lambda_t h_prev_t` written in the same pass and `dL/dh0` the
    final `c`."""
    a_c, hs_c, entering = residuals
    length = a_c.shape[1]
    edge, step = (length - 1, 1) if reverse else (0, -1)

    def emit(c, l, ag):
        lam = ag[1] + c
        # the state before position l: the chunk's entering state at its first position
        h_prev = jnp.where(l == edge, entering, _at(hs_c, jnp.clip(l + step, 0, length - 1)))
        return ag[0] * lam, (lam * h_prev, lam)

    g_c = _chunks(g, length, 0.0)
    (da, lam), _, dh0 = _two_level((a_c, g_c), incoming, not reverse, _affine(True), emit, 2)
    return _unchunk(da, g.shape[0]), _unchunk(lam, g.shape[0]), dh0


def _tree_reduce(a, v, reverse: bool):
    """The steps `x <- a_t x + v_t` composed pairwise, log2(T) levels deep: (end state from zero,
    product of the decays)."""
    while a.shape[0] > 1:
        if a.shape[0] % 2:  # an identity step makes the count even
            a, v = jnp.concatenate([a, jnp.ones_like(a[:1])]), jnp.concatenate([v, jnp.zeros_like(v[:1])])
        pairs = (a[0::2], v[0::2]), (a[1::2], v[1::2])
        a, v = _combine(*(pairs[::-1] if reverse else pairs))
    return v[0], a[0]


def _end_state(a, v, reverse: bool, method: str, adjoint: bool):
    """A slice run from zero, keeping no states: (its end state, the product of its decays `a`).

    The steps are `_affine(adjoint)` run in the direction `reverse`; each method keeps its shape of
    computation (the associative one its log depth)."""
    if method == "associative":
        return _tree_reduce(a, a * v if adjoint else v, reverse)
    advance = _affine(adjoint)
    if method == "chunked":  # the chunks' ends and products, then the chunks as steps
        chunk = _chunk_length(a.shape[0])
        xs = (_chunks(a, chunk, 1.0), _chunks(v, chunk, 0.0))
        (v, a), advance = _chunk_ends(xs, reverse, advance), _carry

    def step(state, av):
        x, product = state
        return (advance(x, av), _mul(product, av[0])), None

    zero = jnp.zeros_like(v[0])
    return lax.scan(step, (zero, jnp.ones_like(zero)), (a, v), reverse=reverse)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _scan(a, b, h0, reverse: bool, method: str):
    return _scan_fwd(a, b, h0, reverse, method)[0]


def _scan_fwd(a, b, h0, reverse: bool, method: str):
    if method == "chunked":
        return _chunked_forward(a, b, h0, reverse)
    hs = (_sequential if method == "sequential" else _associative)(a, b, h0, reverse)
    return hs, (a, hs, h0)


def _scan_bwd(reverse: bool, method: str, residuals, g, incoming=None):
    """The VJP; `incoming` is the cotangent of the last state reached that arrives from beyond the
    slice (from the later devices' slices), zero by default."""
    if incoming is None:
        incoming = jnp.zeros_like(residuals[2][0] if method == "chunked" else residuals[2])
    if method == "chunked":
        return _chunked_adjoint(residuals, g, reverse, incoming)
    a, hs, h0 = residuals
    # lambda_t = g_t + a_next_t * lambda_next_t, run against the forward direction from the
    # incoming cotangent (a_next is 1 past the end); JAX's cotangents of complex products are
    # transposes (no conjugation), so a enters as is.
    a_next = shift(a, jnp.ones_like(h0), toward_start=not reverse)
    lam = (_sequential if method == "sequential" else _associative)(a_next, g, incoming, not reverse)
    h_prev = shift(hs, h0, toward_start=reverse)
    first = -1 if reverse else 0
    return lam * h_prev, lam, a[first] * lam[first]


_scan.defvjp(_scan_fwd, _scan_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _sharded(a, b, h0, reverse: bool, method: str, axis_name):
    """`_scan` of this device's slice of a sequence split over `axis_name`."""
    return _sharded_fwd(a, b, h0, reverse, method, axis_name)[0]


def _sharded_fwd(a, b, h0, reverse: bool, method: str, axis_name):
    end, product = _end_state(a, b, reverse, method, adjoint=False)
    entering, _ = time_sharding.carry_across(end, product, h0, axis_name, reverse, _mul)
    hs, residuals = _scan_fwd(a, b, entering, reverse, method)
    return hs, (residuals, product)


def _sharded_bwd(reverse: bool, method: str, axis_name, saved, g):
    residuals, product = saved
    a = _unchunk(residuals[0], g.shape[0]) if method == "chunked" else residuals[0]
    # the adjoint has the same decays, so the same products carry its cotangents across slices
    end, _ = _end_state(a, g, not reverse, method, adjoint=True)
    incoming, _ = time_sharding.carry_across(end, product, None, axis_name, not reverse, _mul)
    da, db, dh = _scan_bwd(reverse, method, residuals, g, incoming)
    # h0 is read on the first device only (and summed over the devices when it is replicated)
    return da, db, jnp.where(time_sharding.first_device(axis_name, reverse), dh, jnp.zeros_like(dh))


_sharded.defvjp(_sharded_fwd, _sharded_bwd)


def _check(a: PyTree, b: PyTree, h0: PyTree) -> int:
    length = v.time_length("b", b)
    b_struct = jax.tree.structure(b)
    for name, tree in (("a", a), ("h0", h0)):
        if jax.tree.structure(tree) != b_struct:
            raise TypeError(
                f"linear_scan: {name} must have the pytree structure of b; got {jax.tree.structure(tree)} "
                f"but b has {b_struct}."
            )
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(b)]
    for path, a_, b_, h_ in zip(paths, jax.tree.leaves(a), jax.tree.leaves(b), jax.tree.leaves(h0)):
        for name, leaf in (("a", a_), ("b", b_), ("h0", h_)):
            if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
                raise TypeError(
                    f"linear_scan: {name}{path} must be a float or complex array; got dtype "
                    f"{jnp.result_type(leaf).name}."
                )
        if np.shape(h_) != np.shape(b_)[1:]:
            raise ValueError(
                f"linear_scan: h0{path} must have the shape of one step of b{path}, {np.shape(b_)[1:]}; "
                f"got {np.shape(h_)}."
            )
        try:
            broadcast = np.broadcast_shapes(np.shape(a_), np.shape(b_))
        except ValueError:
            broadcast = None
        if broadcast != np.shape(b_):
            raise ValueError(
                f"linear_scan: a{path} must broadcast against b{path} of shape {np.shape(b_)} (time "
                f"leading, e.g. {np.shape(b_)}, {np.shape(b_)[-1:]} or ()); got shape {np.shape(a_)}."
            )
    return length


METHODS = ("auto", "associative", "chunked", "sequential")


def linear_scan(
    a: PyTree, b: PyTree, h0: PyTree, *, reverse: bool = False, method: str = "auto", axis_name: Hashable | None = None
) -> PyTree:
    """All states of the linear recurrence `h_t = a_t * h_{t-1} + b_t`, vectorised over time.

    Equivalent to::

      def linear_scan(a, b, h0):   # one leaf, a broadcast to b's shape
        hs, h = [], h0
        for t in range(len(b)):
          h = a[t] * h + b[t]
          hs.append(h)
        return jnp.stack(hs)

    but elementwise over every leaf and without a Python-level or per-step loop over T (see
    `method`). Time is the leading axis of `b`. With `reverse=True` the recurrence runs backwards,
    `h_t = a_t * h_{t+1} + b_t` from `h_T = h0`, and `hs[0]` is the last state reached.

    Differentiable with respect to `a`, `b` and `h0` by a hand-written VJP: one scan (by the same
    method) of the adjoint recurrence run the other way, `lambda_t = g_t + a_{t+1} lambda_{t+1}`
    (cotangents follow JAX's convention for complex numbers: transposes, not conjugates).

    With `axis_name`, the call runs inside `jax.shard_map` with time split over that mesh axis: `a`
    (when it varies over time), `b` and the returned states are this device's slice, the devices'
    slices in the order of their index along the axis (as `in_specs=P(axis_name)` lays out
    time-major arrays). Each device runs its slice from zero for the slice's end state and decay
    product, one all-gather exchanges those pairs, a short pass over the devices gives each slice
    its entering state, and the slice is scanned again from it; the VJP exchanges the adjoint's
    pairs the same way from the last slice to the first. Values and gradients equal the unsharded
    call's up to rounding, at about twice one scan's work and 1/n of its memory per device.

    Args:
      a: the decays: a pytree with the structure of `b`, each leaf broadcastable against the leaf of
        `b` (shape `(T, ...)` for a time-varying decay, `(...)` or `()` for a shared one).
      b: the inputs: a pytree of arrays shaped `(T, ...)`, float or complex.
      h0: the initial state: the structure of `b`, each leaf shaped like one step of `b`. Split over
        devices, the first device's `h0` (the last's with `reverse=True`) starts the sequence: pass
        it replicated (`P()`), and its gradient is the whole sequence's.
      reverse: run the recurrence from the last step to the first.
      method: `"associative"`: `lax.associative_scan`, O(log T) depth, for GPUs and TPUs;
        `"chunked"`: a two-level scan (chunks of about sqrt(T)/2 steps, fastest when T has a divisor
        near that; otherwise the last chunk is padded); `"sequential"`: one `lax.scan`, for CPUs,
        where the recurrence is bound by memory bandwidth and the associative scan's passes over
        memory cost more than a loop; `"auto"` (default): `"sequential"` when
        `jax.default_backend()` is `"cpu"`, else `"associative"`. All give the same values up to
        rounding, and the same hand-written VJP; split over devices, each slice uses `method`.
        The associative and chunked methods and a split over devices form products of decays over
        stretches of steps: a zero decay forgets the past exactly in every method, but where such
        a product overflows (decays far above 1) they give inf where the sequential loop, which
        only forms states, may stay finite. With `|a| <= 1` products never overflow.
      axis_name: the mesh axis that time is split over, inside `jax.shard_map` (None: one device).
        T must be a multiple of the axis size, since `shard_map` splits arrays evenly and refuses
        other lengths: pad at the end with identity steps (`a = 1`, `b = 0`; a decay shared over
        time broadcast first), which leave the first T states and the final state unchanged.

    Returns:
      `hs`, with the structure of `b`: each leaf `(T, ...)` (this device's slice with `axis_name`)
      of dtype `result_type(a, b, h0)`.

    Raises:
      TypeError: for pytrees of different structures or integer leaves.
      ValueError: for `b` without a common leading axis, an `h0` leaf not shaped like one step of
        `b`, an `a` leaf that does not broadcast against `b`, an unknown `method`, or an
        `axis_name` that names no bound axis.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxbptt as jb
      >>> hs = jb.linear_scan(jnp.full((4, 1), 0.5), jnp.ones((4, 1)), jnp.zeros(1))
      >>> hs[:, 0].tolist()
      [1.0, 1.5, 1.75, 1.875]
      >>> jb.linear_scan(jnp.float32(0.5), jnp.ones(4), jnp.float32(0.0), reverse=True).tolist()
      [1.875, 1.75, 1.5, 1.0]

      Time split over the devices of a mesh axis (here however many there are):

      >>> from jax.sharding import PartitionSpec as P
      >>> n = jax.device_count()
      >>> mesh = jax.make_mesh((n,), ("time",), axis_types=(jax.sharding.AxisType.Auto,))
      >>> scan = jax.jit(jax.shard_map(lambda a, b, h0: jb.linear_scan(a, b, h0, axis_name="time"),
      ...                              mesh=mesh, in_specs=(P(), P("time"), P()), out_specs=P("time")))
      >>> scan(jnp.float32(0.5), jnp.ones(4 * n), jnp.float32(0.0))[:4].tolist()
      [1.0, 1.5, 1.75, 1.875]
    """
    if not isinstance(reverse, bool):
        raise TypeError(f"linear_scan: reverse must be a bool; got {reverse!r}.")
    length = _check(a, b, h0)
    if method not in METHODS:
        raise ValueError(f"linear_scan: method must be one of {', '.join(map(repr, METHODS))}; got {method!r}.")
    if method == "auto":
        method = "sequential" if jax.default_backend() == "cpu" else "associative"
    if axis_name is not None:
        time_sharding.axis_size("linear_scan", axis_name)

    def leaf(a_, b_, h_):
        dtype = jnp.result_type(a_, b_, h_)
        b_ = jnp.asarray(b_, dtype)
        if length == 0:
            return b_
        a_, b_, h_ = time_sharding.match_varying(jnp.asarray(a_, dtype), b_, jnp.asarray(h_, dtype))
        a_ = jnp.broadcast_to(a_, b_.shape)
        if axis_name is None:
            return _scan(a_, b_, h_, reverse, method)
        return _sharded(a_, b_, h_, reverse, method, axis_name)

    return jax.tree.map(leaf, a, b, h0)
