"""`deer`: any recurrence solved in parallel over time by Newton's method (DEER / quasi-DEER).

The sequence `s_t = f(s_{t-1}, x_t)` is the root of `F(s)_t = s_t - f(s_{t-1}, x_t)`. Linearising
`f` around a guess `s^k` turns each Newton step into a linear recurrence,

    s^{k+1}_t = J_t s^{k+1}_{t-1} + (f(s^k_{t-1}, x_t) - J_t s^k_{t-1}),   J_t = df/ds at s^k_{t-1},

which an associative scan solves in O(log T) depth: with the full Jacobians (DEER, Lim et al. 2024,
"Parallelizing non-linear sequential models over the sequence length"), a scan over `(n, n)`
matrices; with their diagonals (quasi-DEER, Gonzalez et al. 2024, "Towards Scalable and Stable
Parallelization of Nonlinear RNNs"), an elementwise `linear_scan`. Either way iteration k makes the
first k states exact (the recurrence is causal), so T iterations always reach the sequential answer;
Newton usually needs far fewer.

The gradient does not backpropagate through the iterations. At the solution, the adjoint of
`s_t = f(s_{t-1}, x_t)` is the linear recurrence `lambda_t = g_t + J_{t+1}^T lambda_{t+1}`: one
reverse matrix associative scan with the full Jacobians at the solution (in both modes, so that the
gradient is exact), then one batched VJP of `f` over all steps.

Split over devices along time (`axis_name`), every piece stays local to a device's slice but three:
the state before each slice's first step comes from the previous device (one `ppermute`), the
linear solves carry their states across slices (`time_sharding.carry_across`: for the matrix scan,
the slice's cumulative products from its associative scan carry the entering state to every step),
and the convergence test takes its maximum over all devices.
"""

from __future__ import annotations

from typing import Hashable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.flatten_util import ravel_pytree

from .. import _validate as v
from .._parallel import time_sharding
from .._parallel.linear_scan import linear_scan
from .._parallel.time_sharding import shift
from .._types import PyTree, StepFn


class DeerInfo(NamedTuple):
    """How the Newton iterations of `jaxbptt.deer` ended.

    Attributes:
      iterations: shape=(), int32: Newton iterations run (at most `max_iters`).
      max_change: shape=(), the largest change of any state entry in the last iteration (below `tol`
        when converged; `inf` if no iteration ran).
    """

    iterations: jax.Array
    max_change: jax.Array


def _matmul(a, b):
    return jnp.einsum("...ij,...jk->...ik", a, b)


def _matvec(a, x):
    return jnp.einsum("...ij,...j->...i", a, x)


def _combine(earlier, later):
    a1, b1 = earlier
    a2, b2 = later
    return _matmul(a2, a1), _matvec(a2, b1) + b2


def _matrix_scan(a, b, h0, reverse=False, axis_name=None):
    """`h_t = a_t @ h_{t-1} + b_t` (a: (T, n, n), b: (T, n), h0: (n,)) by an associative scan;
    with `axis_name`, of this device's slice of a sequence split over that axis."""
    if axis_name is None:
        first = -1 if reverse else 0
        b = b.at[first].add(a[first] @ h0)
        return lax.associative_scan(_combine, (a, b), reverse=reverse)[1]
    products, local = lax.associative_scan(_combine, (a, b), reverse=reverse)
    last = 0 if reverse else -1
    entering, _ = time_sharding.carry_across(local[last], products[last], h0, axis_name, reverse, _matvec)
    return local + products @ entering


def _solver(f, length: int, quasi: bool, max_iters: int, tol, axis_name):
    """The custom-VJP solve `(params, s0, xs) -> (states (T, n), DeerInfo)` of `s_t = f(params, s_{t-1}, x_t)`."""
    f_all = jax.vmap(f, in_axes=(None, 0, 0))
    jac_all = jax.vmap(jax.jacfwd(f, argnums=1), in_axes=(None, 0, 0))

    def previous(s0, states):
        return shift(states, s0, toward_start=False, axis_name=axis_name)

    def largest(x):  # over the whole sequence, so that every device stops at the same iteration
        return jnp.max(x) if axis_name is None else lax.pmax(jnp.max(x), axis_name)

    def newton(params, s0, xs):
        scale = None if tol is not None else jnp.sqrt(jnp.finfo(s0.dtype).eps)

        def body(state):
            k, states, _ = state
            prev = previous(s0, states)
            fs, jac = f_all(params, prev, xs), jac_all(params, prev, xs)
            if quasi:
                diag = jnp.diagonal(jac, axis1=-2, axis2=-1)
                new = linear_scan(diag, fs - diag * prev, s0, axis_name=axis_name)
            else:
                new = _matrix_scan(jac, fs - _matvec(jac, prev), s0, axis_name=axis_name)
            return k + 1, new, largest(jnp.abs(new - states))

        def cond(state):
            k, states, change = state
            limit = tol if tol is not None else scale * jnp.maximum(1, largest(jnp.abs(states)))
            return (k < max_iters) & ~(change <= limit)

        init = (jnp.zeros((), jnp.int32), jnp.broadcast_to(s0, (length,) + s0.shape),
                jnp.full((), jnp.inf, s0.dtype))
        k, states, change = lax.while_loop(cond, body, init)
        return states, DeerInfo(k, change)

    @jax.custom_vjp
    def solve(params, s0, xs):
        return newton(params, s0, xs)

    def solve_fwd(params, s0, xs):
        states, info = newton(params, s0, xs)
        return (states, info), (params, s0, xs, states)

    def solve_bwd(res, cts):
        params, s0, xs, states = res
        g = cts[0]
        prev = previous(s0, states)
        jac_t = jnp.swapaxes(jac_all(params, prev, xs), -1, -2)
        # lambda_t = g_t + J_{t+1}^T lambda_{t+1}: a reverse scan whose decay at t is J_{t+1}^T.
        a_next = shift(jac_t, jnp.zeros_like(jac_t[0]), toward_start=True, axis_name=axis_name)
        lam = _matrix_scan(a_next, g, jnp.zeros_like(s0), reverse=True, axis_name=axis_name)
        _, vjp = jax.vjp(f_all, params, prev, xs)
        d_params, d_prev, d_xs = vjp(lam)
        # d_prev[0] is the cotangent of the state before the slice: s0's on the first device; on
        # the others, that of the previous slice's last state, already carried by the scan
        ds0 = d_prev[0] if axis_name is None else jnp.where(time_sharding.first_device(axis_name, False),
                                                               d_prev[0], jnp.zeros_like(d_prev[0]))
        return d_params, ds0, d_xs

    solve.defvjp(solve_fwd, solve_bwd)
    return solve


def _check_options(quasi, max_iters, tol) -> None:
    if not isinstance(quasi, bool):
        raise TypeError(f"deer: quasi must be a bool; got {quasi!r}.")
    if max_iters is not None and (isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 1):
        raise ValueError(f"deer: max_iters must be None or an int >= 1; got max_iters={max_iters!r}.")
    if tol is not None and (isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0):
        raise ValueError(f"deer: tol must be None or a float >= 0; got tol={tol!r}.")


def deer(
    step: StepFn,
    params: PyTree,
    carry: PyTree,
    xs: PyTree,
    *,
    quasi: bool = False,
    max_iters: int | None = None,
    tol: float | None = None,
    return_info: bool = False,
    axis_name: Hashable | None = None,
):
    """`lax.scan` of any step, solved in parallel over time by Newton iterations (DEER / quasi-DEER).

    Computes the same `(final_carry, ys)` as
    `lax.scan(lambda c, x: step(params, c, x), carry, xs)`: starting from every state equal to
    `carry`, each iteration linearises `step` around the current trajectory and solves the linear
    recurrence for the next one with an associative scan (full Jacobians: DEER, Lim et al. 2024;
    their diagonals: quasi-DEER, Gonzalez et al. 2024). Iteration k makes the first k states exact,
    so `max_iters = T` (the default) always reaches the sequential answer; the loop stops earlier
    when no state entry changed by more than `tol` in the last iteration. The outputs `ys` are then
    one batched call of `step` on the solved states.

    The carry is flattened to one vector of n entries and DEER keeps an `(n, n)` Jacobian per step
    (T n^2 memory, T n^3 work per iteration): map a batch with `jax.vmap` rather than folding it into
    the carry. Gradients (by `jax.grad` / `jax.vjp`) are exact at convergence, in both modes: one
    reverse matrix associative scan of the adjoint recurrence with the full Jacobians at the
    solution, not backpropagation through the iterations. The options of `jaxbptt.value_and_grad`
    (truncation, clipping, ...) do not apply.

    With `axis_name`, the call runs inside `jax.shard_map` with time split over that mesh axis (as
    `jaxbptt.linear_scan(..., axis_name=)`): `xs` and `ys` are this device's slice, every Newton
    iteration's linear solve is split across the devices, the iterations stop together (the
    largest change over all devices), and `final_carry` and `info` are the whole sequence's, on
    every device. Values and gradients equal the unsharded call's.

    Args:
      step: `step(params, carry, x) -> (carry, y)`, with a float carry.
      params, carry, xs: as for `lax.scan`; time is the leading axis of every leaf of `xs`.
      quasi: use only the diagonal of each Jacobian (quasi-DEER: elementwise scans, n instead of
        n^2 memory per step; converges linearly instead of quadratically).
      max_iters: the most Newton iterations (default T, which guarantees the exact answer).
      tol: stop once the largest change of a state entry is at most `tol` (default
        `sqrt(eps) * max(1, max |s|)` in the carry's dtype; quasi-DEER, converging linearly, may need a
        smaller `tol` for full accuracy). `tol=0` runs until the states stop changing or `max_iters`.
      return_info: also return a `DeerInfo(iterations, max_change)`.
      axis_name: the mesh axis that time is split over, inside `jax.shard_map` (None: one device).
        T must be a multiple of the axis size (`shard_map` splits arrays evenly).

    Returns:
      `(final_carry, ys)`, or `(final_carry, ys, info)` with `return_info=True`.

    Raises:
      TypeError / ValueError: at trace time, for a step that changes its carry, xs without a common
        time axis, options out of range, or an `axis_name` that names no bound axis.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxbptt as jb
      >>> cell = jb.gru(4)
      >>> params = cell.init(jax.random.key(0), 2)
      >>> xs = jax.random.normal(jax.random.key(1), (64, 2))
      >>> final, ys, info = jb.deer(cell.step, params, cell.initial_carry(), xs, return_info=True)
      >>> _, ys_seq = jax.lax.scan(lambda h, x: cell.step(params, h, x), cell.initial_carry(), xs)
      >>> bool(jnp.allclose(ys, ys_seq, atol=1e-5)), bool(info.iterations < 64)
      (True, True)
    """
    v.check_callable("step", step)
    _check_options(quasi, max_iters, tol)
    if not isinstance(return_info, bool):
        raise TypeError(f"deer: return_info must be a bool; got {return_info!r}.")
    length = v.time_length("xs", xs)
    devices = 1 if axis_name is None else time_sharding.axis_size("deer", axis_name)
    carry = v.check_carry(step, params, carry, xs)
    for keypath, leaf in jax.tree_util.tree_leaves_with_path(carry):
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            raise TypeError(f"deer: every carry leaf must be a real float array; carry"
                            f"{jax.tree_util.keystr(keypath)} has dtype {leaf.dtype.name}.")
    if length == 0:
        final, ys = lax.scan(lambda c, x: step(params, c, x), carry, xs)
        info = DeerInfo(jnp.zeros((), jnp.int32), jnp.full((), jnp.inf))
        return (final, ys, info) if return_info else (final, ys)
    s0, unravel = ravel_pytree(carry)

    def f(params, s, x):
        return ravel_pytree(step(params, unravel(s), x)[0])[0]

    solve = _solver(f, length, quasi, length * devices if max_iters is None else max_iters, tol, axis_name)
    # the solve's custom VJP returns cotangents that vary over the devices as its outputs do
    leaves, tree = jax.tree.flatten((params, s0, xs))
    params, s0, xs = jax.tree.unflatten(tree, time_sharding.match_varying(*map(jnp.asarray, leaves)))
    states, info = solve(params, s0, xs)
    prev = shift(states, s0, toward_start=False, axis_name=axis_name)
    _, ys = jax.vmap(lambda s, x: step(params, unravel(s), x))(prev, xs)
    last = states[-1] if axis_name is None else time_sharding.last_on_every_device(states[-1], axis_name)
    return (unravel(last), ys, info) if return_info else (unravel(last), ys)
