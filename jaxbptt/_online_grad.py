"""`online_grad`: gradients computed forward in time beside BPTT -- RTRL, SnAp-n and UORO.

Each method carries forward an estimate of the influence `J_t = d carry_t / d params` and adds, at
every step, `dL_t/dparams ~= dL_t/dparams|immediate + dL_t/dcarry_{t-1} . J_{t-1}`. Parameters and
carries of any pytree structure are flattened with `ravel_pytree`: the carry is one vector
(batch included), so RTRL's influence has |carry| rows -- for a carry of B examples of H units,
B blocks of H x |params|, one per example, since examples do not interact. SnAp stores only its
pattern's entries where that is cheaper; UORO keeps one rank-one estimate per example.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.flatten_util import ravel_pytree

from . import _validate as v
from ._api import check_call, loss_dtype, value_and_grad, zero_length_result
from ._types import LossFn, PyTree, StepFn

DEFAULT_MAX_INFLUENCE_BYTES = 2**30


class RTRL(NamedTuple):
    """Real-time recurrent learning (Williams & Zipser 1989): the exact influence matrix
    `d carry / d params`, carried forward by `J_t = D_t J_{t-1} + I_t` (`D_t`: the step's carry
    Jacobian, `I_t`: its parameter Jacobian). Its gradient equals exact BPTT's. Memory |carry| x
    |params| (O(H^3) per example for a dense Elman layer of H units), time O(H^4) per step."""


class SnAp(NamedTuple):
    """Menick et al. 2021, "Practical Real Time Recurrent Learning with a Sparse Approximation"
    (ICLR 2021): RTRL's update with the influence kept only on the entries that are non-zero after n
    steps of the recursion from zero influence, `J_t = M_n * (D_t J_{t-1} + I_t)`.

    The pattern `M_n` is found from the step itself, at trace time: the structural non-zeros of the
    immediate Jacobian `I` and of the carry Jacobian `D` at `draws` generic points (small
    deterministic params, carries and float inputs, so nothing saturates; OR'ed, so piecewise-linear
    steps such as ReLU do not lose entries by chance), then `M_1 = pattern(I)`,
    `M_{k+1} = M_1 | M_k pattern(D)^T`. SnAp(1) equals RTRL when the carry Jacobian is diagonal.
    Flag and index inputs are taken as 0 and 1 in turn: one-hot an input that indexes an embedding.

    Where it is cheaper (SnAp(1) on a dense layer: each parameter reaches its own unit), only the
    pattern's entries are stored (for an Elman layer of H units with D inputs, H x (H + D + 1) per
    example instead of RTRL's H x |params|) and updated, `D_t J_{t-1}` from the carry Jacobian's
    columns (one forward pass per colour of a colouring of D's columns: H for a dense layer) and
    `I_t` from one reverse pass per colour of the units (one per example for a dense layer); this
    equals the masked dense update. Time per step is then O(H^3) per example for a dense layer,
    the H passes that read D (a generic step offers its Jacobian only through such passes), against
    RTRL's O(H^4). Denser patterns (SnAp(2) of a dense layer is RTRL) keep the dense influence.

    Attributes:
      n: steps of the sparsity pattern, >= 1.
      draws: random points OR'ed into the pattern, >= 1.
    """

    n: int = 1
    draws: int = 3


class UORO(NamedTuple):
    """Tallec & Ollivier 2017, "Unbiased Online Recurrent Optimization" (ICLR 2018), Algorithm 1:
    the influence as a rank-one product `s~ theta~^T`, unbiased over random signs `nu`::

      g_t     = dL_t/dparams|immediate + (dL_t/dcarry_{t-1} . s~) theta~
      s~'     = D_t s~                                  (forward mode)
      dtheta  = nu^T I_t                                (reverse mode), nu: random signs like carry
      rho0    = sqrt(|theta~| / (|s~'| + eps)) + eps,   rho1 = sqrt(|dtheta| / (|nu| + eps)) + eps
      s~      = rho0 s~' + rho1 nu,                     theta~ = theta~ / rho0 + dtheta / rho1

    The rho scaling balances the two factors' norms, which minimises the variance among such
    rescalings. Each example of a batch has its own `s~`, `theta~` and signs `nu`, as the method is
    stated for one sequence: the examples are the rows of the carry's leading axis (every carry
    leaf's, of one size) when the step does not couple them (checked at trace time at a generic
    point), else the whole carry is one. Needs `key`. Memory |carry| + examples x |params|; time per
    step one forward, one tangent and one reverse pass per example.

    Attributes:
      eps: the stabilising epsilon of the rho scaling.
    """

    eps: float = 1e-7


class TBPTT(NamedTuple):
    """Truncated BPTT (Williams & Peng 1990): errors of chunks of k1 steps backpropagated through
    windows of k2 steps, as `value_and_grad(..., truncation=(k1, k2))` and `online_tbptt`."""

    k1: int
    k2: int


METHODS = (RTRL, SnAp, UORO, TBPTT)


def check_method(method) -> None:
    if not isinstance(method, METHODS):
        raise TypeError(f"method must be one of jb.RTRL(), jb.SnAp(n), jb.UORO(), jb.TBPTT(k1, k2); got {method!r}.")
    if isinstance(method, SnAp):
        for name in ("n", "draws"):
            value = getattr(method, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SnAp needs {name} a positive int; got {name}={value!r}.")
    if isinstance(method, UORO) and not method.eps > 0:
        raise ValueError(f"UORO needs eps > 0; got eps={method.eps!r}.")
    if isinstance(method, TBPTT):
        v.check_truncation((method.k1, method.k2))


def check_max_bytes(max_influence_bytes) -> None:
    if isinstance(max_influence_bytes, bool) or not isinstance(max_influence_bytes, int) or max_influence_bytes < 1:
        raise ValueError(f"max_influence_bytes must be a positive int; got {max_influence_bytes!r}.")


class Tracker(NamedTuple):
    """A method's forward recursion over flat params `theta` and flat carry `c`:
    `trace = init(theta, c)`, `trace, c, loss, g = advance(theta, trace, c, x, target, key)`;
    `unravel_*` convert the flat vectors back to pytrees. The trace is a pytree of float arrays
    whose zero is the state of a new sequence; index tables are static, closed over."""

    init: Callable
    advance: Callable
    unravel_params: Callable
    unravel_carry: Callable


def _floats_only(name, tree):
    for keypath, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise TypeError(f"online gradients need float leaves in {name}; {name}{jax.tree_util.keystr(keypath)} "
                            f"has dtype {jnp.result_type(leaf)}.")


def check_influence(method, params, carry, *, max_influence_bytes) -> None:
    """Float params and carry; for RTRL and SnAp, an influence matrix within max_influence_bytes."""
    _floats_only("params", params)
    _floats_only("carry", carry)
    if not isinstance(method, (RTRL, SnAp)):
        return
    theta, c = ravel_pytree(params)[0], ravel_pytree(carry)[0]
    n_params, n_carry = theta.size, c.size
    # the dense influence and the identity its forward-mode rows start from; SnAp finds its
    # pattern from a dense Jacobian of the same size once, at trace time
    need = jnp.dtype(jnp.result_type(theta, c)).itemsize * n_params * (n_carry + n_params)
    if need > max_influence_bytes:
        raise ValueError(
            f"{type(method).__name__}'s influence matrix d carry / d params holds |carry| x |params| = "
            f"{n_carry} x {n_params} entries (with the {n_params} x {n_params} identity its columns start from, "
            f"{need / 2**20:.1f} MiB), above max_influence_bytes={max_influence_bytes} "
            f"({max_influence_bytes / 2**20:.1f} MiB). Use a smaller model or batch, jb.UORO(), "
            "or raise max_influence_bytes."
        )


def make_tracker(step, loss_fn, method, params, carry, x, *, max_influence_bytes) -> Tracker:
    """The forward recursion of `method` for this step's parameter and carry shapes (`x`: one
    step's input, for SnAp's pattern and UORO's examples)."""
    check_influence(method, params, carry, max_influence_bytes=max_influence_bytes)
    theta0, unravel_params = ravel_pytree(params)
    c0, unravel_carry = ravel_pytree(carry)
    n_params, n_carry = theta0.size, c0.size

    def flat_step(theta, c, x):
        new, y = step(unravel_params(theta), unravel_carry(c), x)
        return ravel_pytree(new)[0].astype(c.dtype), y

    def step_and_loss(x, target):
        def f(theta, c):
            new, y = flat_step(theta, c, x)
            return new, loss_fn(y, target)
        return f

    if isinstance(method, (RTRL, SnAp)):
        mask = None
        if isinstance(method, SnAp):
            mask, carry_pattern = _pattern(flat_step, method, theta0, c0, x)
            sparse = _Sparse.build(mask, carry_pattern)
            if sparse.cheaper_than_dense():
                return _sparse_tracker(flat_step, step_and_loss, sparse, unravel_params, unravel_carry)

        def rtrl_advance(theta, influence, c, x, target, key):
            (new, loss), lin = jax.linearize(step_and_loss(x, target), theta, c)
            eye = jnp.eye(n_params, dtype=theta.dtype)
            # row p: the tangent of (carry, loss) along theta_p, with the carry's tangent J_{t-1}[p]
            new_influence, grad = jax.vmap(lin)(eye, influence)
            if mask is not None:
                new_influence = jnp.where(mask, new_influence, 0)
            # inputs of a wider dtype than params or carry must not widen the recursion's state
            return new_influence.astype(influence.dtype), new, loss, grad.astype(theta.dtype)

        return Tracker(lambda theta, c: jnp.zeros((n_params, n_carry), c.dtype), rtrl_advance,
                       unravel_params, unravel_carry)

    ids, n_blocks = _examples(flat_step, carry, theta0, c0, x)
    block_masks = jnp.asarray(ids[None] == np.arange(n_blocks)[:, None])

    def block_norms(a):
        return jnp.sqrt(jax.ops.segment_sum(a * a, ids, n_blocks))

    def uoro_init(theta, c):
        return jnp.zeros_like(c), jnp.zeros((n_blocks, theta.size), theta.dtype)

    def uoro_advance(theta, trace, c, x, target, key):
        s, th = trace
        eps = method.eps
        (new, loss), vjp = jax.vjp(step_and_loss(x, target), theta, c)
        g_theta, g_c = vjp((jnp.zeros_like(new), jnp.ones_like(loss)))
        grad = (g_theta + jax.ops.segment_sum(g_c * s, ids, n_blocks) @ th).astype(theta.dtype)
        _, s_new = jax.jvp(lambda cc: flat_step(theta, cc, x)[0], (c,), (s,))
        nu = jax.random.rademacher(key, c.shape, c.dtype)
        # each example's own nu^T I_t: one reverse pass per example (the step mixes the batch's
        # parameter gradients, so they cannot be told apart from one pass)
        d_theta = jax.vmap(lambda m: vjp((jnp.where(m, nu, 0), jnp.zeros_like(loss)))[0])(block_masks)
        rho0 = jnp.sqrt(jnp.linalg.norm(th, axis=1) / (block_norms(s_new) + eps)) + eps
        rho1 = jnp.sqrt(jnp.linalg.norm(d_theta, axis=1) / (block_norms(nu) + eps)) + eps
        s = (rho0[ids] * s_new + rho1[ids] * nu).astype(s.dtype)
        th = (th / rho0[:, None] + d_theta / rho1[:, None]).astype(th.dtype)
        return (s, th), new, loss, grad

    return Tracker(uoro_init, uoro_advance, unravel_params, unravel_carry)


def _generic(tree, seed, fill=0):
    """Deterministic generic values in [-0.1, 0.1] shaped like `tree`'s float leaves (cosines of an
    irrational stride, cheaper to compile than a random number generator); other leaves (flags,
    indices) all `fill`. Small, so that no activation saturates: a saturated tanh has an exactly
    zero derivative in float32, which would read as a structural zero."""
    leaves, structure = jax.tree.flatten(tree)
    out = []
    for i, leaf in enumerate(leaves):
        shape, dtype = jnp.shape(leaf), jnp.result_type(leaf)
        if jnp.issubdtype(dtype, jnp.floating):
            phase = jnp.arange(np.prod(shape, dtype=int), dtype=dtype).reshape(shape) * 0.6180339887
            phase = phase + (seed * 7.31 + i * 1.37)
            out.append(0.1 * jnp.cos(phase * 2.7182818))
        else:
            out.append(jnp.full(shape, fill, dtype))
    return jax.tree.unflatten(structure, out)


def _concrete(name, fn):
    """`fn()` as NumPy at trace time: the static structure the sparse layouts are built on."""
    try:
        with jax.ensure_compile_time_eval():
            return jax.tree.map(np.asarray, fn())
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError) as e:
        raise ValueError(f"{name} is found from the step at generic points at trace time, which needs a step that "
                         "does not close over traced values (pass them in params or xs instead).") from e


def _pattern(flat_step, method: SnAp, theta, c, x):
    """SnAp's mask (|params| x |carry|, NumPy) and the carry Jacobian's pattern (|carry| x |carry|):
    the structural non-zeros of the influence after n steps from zero, `M_1 = pattern(I)`,
    `M_{k+1} = M_1 | M_k pattern(D)^T`, with the Jacobians' patterns OR'ed over `draws` generic
    points (params, carry and float inputs generic; flag and index inputs 0 and 1 in turn), so
    piecewise-linear steps (ReLU) do not lose entries by chance. An input used as an index (an
    embedding's token) should be one-hot for SnAp: the pattern sees the indices 0 and 1 only."""

    def jacobians(d):
        jac = jax.jacrev(lambda th, cc: flat_step(th, cc, _generic(x, 3 * d + 2, d % 2))[0], argnums=(0, 1))
        immediate, carry_jac = jac(_generic(theta, 3 * d), _generic(c, 3 * d + 1))
        return immediate.T != 0, carry_jac != 0

    immediate, carry_pattern = _concrete("SnAp's sparsity pattern", lambda: jax.tree.map(
        lambda *a: jnp.any(jnp.stack(a), axis=0), *[jacobians(d) for d in range(method.draws)]))
    mask = immediate
    for _ in range(method.n - 1):
        mask = immediate | (mask.astype(np.int64) @ carry_pattern.T.astype(np.int64) > 0)
    return mask, carry_pattern


def _color(conflicts) -> np.ndarray:
    """A greedy colouring of a symmetric boolean conflict matrix: nodes of one colour never conflict."""
    colors = np.full(conflicts.shape[0], -1, np.int32)
    for node in range(conflicts.shape[0]):
        taken = colors[conflicts[node] & (colors >= 0)]
        colors[node] = np.setdiff1d(np.arange(taken.size + 1), taken)[0]
    return colors


class _Sparse(NamedTuple):
    """SnAp's influence stored on its pattern only: entry e is (param rows[e], carry cols[e]).
    `same_row[e]` lists the entries of row rows[e] (padded with nnz, an always-zero slot), where
    `D_t J_{t-1}` at e needs the carry Jacobian D[cols[e], cols[same_row[e]]] (`d_live`: the
    pattern of D there). D comes from one forward pass per colour of `d_colors` (columns of D
    whose rows do not meet share a pass), the immediate Jacobian I from one reverse pass per
    colour of `i_colors` (carry units with disjoint parameter sets share a pass)."""

    n_params: int
    rows: np.ndarray
    cols: np.ndarray
    same_row: np.ndarray
    d_live: np.ndarray
    d_colors: np.ndarray
    i_colors: np.ndarray

    @staticmethod
    def build(mask, carry_pattern) -> "_Sparse":
        rows, cols = (a.astype(np.int32) for a in np.nonzero(mask))  # row-major: each row's entries are contiguous
        counts = mask.sum(1)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        width = max(int(counts.max(initial=0)), 1)
        offsets = np.arange(width)[None]
        same_row = np.where(offsets < counts[rows][:, None], starts[rows][:, None] + offsets, rows.size)
        same_row = same_row.astype(np.int32)
        padded_cols = np.concatenate([cols, [0]])[same_row]
        d_live = carry_pattern[cols[:, None], padded_cols] & (same_row < rows.size)
        m = mask.astype(np.int64)
        d_colors = _color(carry_pattern.T.astype(np.int64) @ carry_pattern.astype(np.int64) > 0)
        i_colors = _color(m.T @ m > 0)
        return _Sparse(mask.shape[0], rows, cols, same_row, d_live, d_colors, i_colors)

    def cheaper_than_dense(self) -> bool:
        """The gathers and passes cost less than the dense update's one forward pass per parameter."""
        passes = self.d_colors.max(initial=0) + self.i_colors.max(initial=0) + 3
        return self.same_row.size < self.n_params * self.d_colors.size and passes < self.n_params


def _sparse_tracker(flat_step, step_and_loss, sp: _Sparse, unravel_params, unravel_carry) -> Tracker:
    """SnAp's update `J_t = M * (D_t J_{t-1} + I_t)` on the pattern's entries only: for entry
    e = (p, j), `sum_{k in row p} D[j, k] J[p, k] + I[p, j]`, since J_{t-1} is zero off the
    pattern. Equals the masked dense update, for a pattern that holds the step's non-zeros."""
    nnz = sp.rows.size
    d_tangents = jnp.asarray(sp.d_colors[None] == np.arange(sp.d_colors.max(initial=0) + 1)[:, None])
    i_cotangents = jnp.asarray(sp.i_colors[None] == np.arange(sp.i_colors.max(initial=0) + 1)[:, None])
    d_at = (sp.d_colors[np.concatenate([sp.cols, [0]])[sp.same_row]], sp.cols[:, None])
    i_at = (sp.i_colors[sp.cols], sp.rows)

    def advance(theta, influence, c, x, target, key):
        (new, loss), vjp = jax.vjp(step_and_loss(x, target), theta, c)
        g_theta, g_c = vjp((jnp.zeros_like(new), jnp.ones_like(loss)))
        # dL_t/dcarry_{t-1} . J_{t-1}, summed into each entry's parameter
        grad = g_theta + jax.ops.segment_sum(g_c[sp.cols] * influence, sp.rows, theta.size)
        # column sums of D and rows of I over each colour: no two members meet, so each sum is one entry
        carry_tangent = lambda t: jax.jvp(lambda cc: flat_step(theta, cc, x)[0], (c,), (t.astype(c.dtype),))[1]
        d_sums = jax.vmap(carry_tangent)(d_tangents)
        i_sums = jax.vmap(lambda m: vjp((m.astype(new.dtype), jnp.zeros_like(loss)))[0])(i_cotangents)
        padded = jnp.concatenate([influence, jnp.zeros((1,), influence.dtype)])
        propagated = jnp.sum(jnp.where(sp.d_live, d_sums[d_at], 0) * padded[sp.same_row], axis=1)
        new_influence = (propagated + i_sums[i_at]).astype(influence.dtype)
        return new_influence, new, loss, grad.astype(theta.dtype)

    return Tracker(lambda theta, c: jnp.zeros((nnz,), c.dtype), advance, unravel_params, unravel_carry)


def _examples(flat_step, carry, theta, c, x):
    """UORO's independent examples: the rows of the carry's leading axis (every leaf's, of one
    size) when the step does not couple them (checked at a generic point with 2 log2(rows) forward
    passes: rows whose index has bit b set, then clear, must not reach the others), else one.
    Returns each flat carry entry's example and the number of examples."""
    leaves = jax.tree.leaves(carry)
    sizes = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else 0 for leaf in leaves}
    rows = sizes.pop() if len(sizes) == 1 else 0
    one = np.zeros(c.size, np.int32), 1
    if rows < 2:
        return one
    ids = np.concatenate([np.broadcast_to(np.arange(rows).reshape((rows,) + (1,) * (jnp.ndim(leaf) - 1)),
                                          jnp.shape(leaf)).ravel() for leaf in leaves]).astype(np.int32)
    bits = [(ids >> b) & 1 == side for b in range(int(rows - 1).bit_length()) for side in (0, 1)]

    def leaks():
        f = lambda cc: flat_step(_generic(theta, 0), cc, _generic(x, 2))[0]
        c_r = _generic(c, 1)
        return [jnp.any(jnp.where(sel, 0, jax.jvp(f, (c_r,), (jnp.where(sel, 1, 0).astype(c.dtype),))[1]) != 0)
                for sel in bits]

    return one if any(_concrete("UORO's examples", leaks)) else (ids, rows)


def online_grad(
    step: StepFn,
    loss_fn: LossFn,
    method,
    *,
    max_influence_bytes: int = DEFAULT_MAX_INFLUENCE_BYTES,
) -> Callable:
    """The sequence loss and an online estimate of its parameter gradient, computed forward in time.

    With the parameters held fixed over the sequence, returns `sum_t g_t`, where `g_t` is the
    method's estimate of `dL_t/dparams` formed at step t from what is known at step t::

      trace = zero influence; g = 0
      for t in range(T):
        carry, y_t = step(params, carry, xs[t])
        g += dL_t/dparams|immediate + dL_t/dcarry_{t-1} . influence_{t-1}  (the method's estimate)
        trace = the method's influence update

    `jb.RTRL()` gives exact BPTT's gradient; `jb.SnAp(n)` a sparse approximation; `jb.UORO()` an
    unbiased rank-one estimate (needs `key`); `jb.TBPTT(k1, k2)` is `value_and_grad(...,
    truncation=(k1, k2))`, for comparison under one API. Time is the leading axis of `xs` and
    `targets`.

    Args:
      step, loss_fn: as in `jaxbptt.value_and_grad`; params and carry leaves must be floats.
      method: `jb.RTRL()`, `jb.SnAp(n)`, `jb.UORO()` or `jb.TBPTT(k1, k2)`.
      max_influence_bytes: RTRL and SnAp refuse (ValueError, with the size) a step whose influence
        matrix, |carry| x |params| entries plus the |params| x |params| identity its forward-mode
        columns start from, would exceed this many bytes (default 1 GiB).

    Returns:
      A function `(params, carry, xs, targets, key=None) -> ((loss, final_carry), grads)`, `grads`
      shaped like `params`.

    Raises:
      TypeError / ValueError: at trace time, for a method that is not one of the four, a UORO call
        without `key`, an influence above `max_influence_bytes`, non-float params or carry leaves,
        and the checks of `value_and_grad`.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxbptt as jb
      >>> model = jb.with_readout(jb.elman(4), 1)
      >>> params = model.init(jax.random.key(0), 2)
      >>> xs, targets = jnp.ones((10, 3, 2)), jnp.zeros((10, 3, 1))
      >>> mse = lambda y, t: jnp.mean((y - t) ** 2)
      >>> (loss, final), grads = jb.online_grad(model.step, mse, jb.RTRL())(params, model.initial_carry((3,)), xs, targets)
      >>> (_, _), exact = jb.value_and_grad(model.step, mse)(params, model.initial_carry((3,)), xs, targets)
      >>> bool(jnp.allclose(grads["cell"]["W_hh"], exact["cell"]["W_hh"], atol=1e-5))
      True
    """
    v.check_callable("step", step)
    v.check_callable("loss_fn", loss_fn)
    check_method(method)
    check_max_bytes(max_influence_bytes)

    def online_grad_fn(params, carry, xs, targets, key=None):
        if isinstance(method, TBPTT):
            return value_and_grad(step, loss_fn, truncation=(method.k1, method.k2))(params, carry, xs, targets)
        if isinstance(method, UORO) and key is None:
            raise ValueError("online_grad with method=jb.UORO() needs key=jax.random.key(...) (its random signs); got key=None.")
        length, carry = check_call(step, loss_fn, 0, params, carry, xs, targets)
        if length == 0:
            dtype = loss_dtype(step, loss_fn, params, carry, xs, targets)
            return zero_length_result(0, params, carry, xs, False, dtype)
        tracker = make_tracker(step, loss_fn, method, params, carry, v.first_step(xs),
                               max_influence_bytes=max_influence_bytes)
        theta, c = ravel_pytree(params)[0], ravel_pytree(carry)[0]
        keys = jax.random.split(key, length) if key is not None else jnp.zeros((length,))
        # the summed loss keeps one step's loss dtype (as value_and_grad's), the carry its own dtype
        # and the gradient the params' dtype, whatever the dtype of the data
        loss_type = loss_dtype(step, loss_fn, params, carry, xs, targets)

        def body(state, inputs):
            trace, c, loss, grad = state
            x, target, k = inputs
            trace, c, step_loss, step_grad = tracker.advance(theta, trace, c, x, target, k)
            return (trace, c, loss + step_loss.astype(loss_type), grad + step_grad), None

        start = (tracker.init(theta, c), c, jnp.zeros((), loss_type), jnp.zeros_like(theta))
        (_, c, loss, grad), _ = lax.scan(body, start, (xs, targets, keys))
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), tracker.unravel_params(grad), params)
        return (loss, tracker.unravel_carry(c)), grads

    return online_grad_fn
