"""`online_grad`: gradients computed forward in time beside BPTT -- RTRL, SnAp-n and UORO.

Each method carries forward an estimate of the influence `J_t = d carry_t / d params` and adds, at
every step, `dL_t/dparams ~= dL_t/dparams|immediate + dL_t/dcarry_{t-1} . J_{t-1}`. Parameters and
carries of any pytree structure are flattened with `ravel_pytree`: the carry is one vector
(batch included), so the influence has |carry| rows -- for a carry of B examples of H units,
B blocks of H x |params|, one per example, since examples do not interact.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.flatten_util import ravel_pytree

from . import _validate as v
from ._api import check_call, value_and_grad, zero_length_result
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

    The pattern `M_n` is found from the step itself: the exact influence after n steps from zero,
    evaluated at `draws` generic points (small deterministic pseudo-random params, carries and float
    inputs, so nothing saturates) and OR'ed, so piecewise-linear steps (ReLU) do not lose entries
    by chance. Integer inputs keep the sequence's first input. SnAp(1) keeps
    the pattern of the immediate Jacobian `I_t`; it equals RTRL when the carry Jacobian is
    diagonal. This implementation masks a dense influence: it shows SnAp's gradient, not its
    savings (a sparse SnAp-1 costs O(H^2) per step for a dense Elman layer).

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
    rescalings. The whole carry (batch included) is one vector with one `s~`, as in the authors'
    reference code; needs `key`. Memory |carry| + |params|, time about two steps per step.

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
    `trace = init(theta, c, x, target)` (one step's x and target, for shapes), `trace, c, loss, g = advance(theta, trace, c, x, target, key)`;
    `ravel`/`unravel_*` convert between pytrees and the flat vectors."""

    init: Callable
    advance: Callable
    unravel_params: Callable
    unravel_carry: Callable


def _floats_only(name, tree):
    for keypath, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise TypeError(f"online gradients need float leaves in {name}; {name}{jax.tree_util.keystr(keypath)} "
                            f"has dtype {jnp.result_type(leaf)}.")


def make_tracker(step, loss_fn, method, params, carry, *, max_influence_bytes) -> Tracker:
    """The forward recursion of `method` for this step's parameter and carry shapes."""
    _floats_only("params", params)
    _floats_only("carry", carry)
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
        # influence rows are parameters: J[p] = d carry / d theta_p, started from the one-hot tangents
        itemsize = jnp.dtype(jnp.result_type(theta0, c0)).itemsize
        need = itemsize * n_params * (n_carry + n_params)
        if need > max_influence_bytes:
            raise ValueError(
                f"{type(method).__name__}'s influence matrix d carry / d params holds |carry| x |params| = "
                f"{n_carry} x {n_params} entries (with the {n_params} x {n_params} identity its columns start from, "
                f"{need / 2**20:.1f} MiB), above max_influence_bytes={max_influence_bytes} "
                f"({max_influence_bytes / 2**20:.1f} MiB). Use a smaller model or batch, jb.UORO(), "
                "or raise max_influence_bytes."
            )

        def propagate(theta, influence, c, x, target):
            (new, loss), lin = jax.linearize(step_and_loss(x, target), theta, c)
            eye = jnp.eye(n_params, dtype=theta.dtype)
            # row p: the tangent of (carry, loss) along theta_p, with the carry's tangent J_{t-1}[p]
            new_influence, grad = jax.vmap(lin)(eye, influence)
            # inputs of a wider dtype than params or carry must not widen the recursion's state
            return new_influence.astype(influence.dtype), new, loss, grad.astype(theta.dtype)

        def rtrl_advance(theta, trace, c, x, target, key):
            influence, mask = trace
            influence, new, loss, grad = propagate(theta, influence, c, x, target)
            if mask is not None:
                influence = jnp.where(mask, influence, 0)
            return (influence, mask), new, loss, grad

        def init(theta, c, x, target):
            zeros = jnp.zeros((n_params, n_carry), c.dtype)
            if isinstance(method, RTRL):
                return zeros, None
            return zeros, _pattern(propagate, method, theta, c, x, target)

        return Tracker(init, rtrl_advance, unravel_params, unravel_carry)

    def uoro_init(theta, c, x, target):
        return jnp.zeros_like(c), jnp.zeros_like(theta)

    def uoro_advance(theta, trace, c, x, target, key):
        s, th = trace
        eps = method.eps
        (new, loss), vjp = jax.vjp(step_and_loss(x, target), theta, c)
        g_theta, g_c = vjp((jnp.zeros_like(new), jnp.ones_like(loss)))
        grad = (g_theta + jnp.vdot(g_c, s) * th).astype(theta.dtype)
        _, s_new = jax.jvp(lambda cc: flat_step(theta, cc, x)[0], (c,), (s,))
        nu = jax.random.rademacher(key, c.shape, c.dtype)
        d_theta = vjp((nu, jnp.zeros_like(loss)))[0]
        rho0 = jnp.sqrt(jnp.linalg.norm(th) / (jnp.linalg.norm(s_new) + eps)) + eps
        rho1 = jnp.sqrt(jnp.linalg.norm(d_theta) / (jnp.linalg.norm(nu) + eps)) + eps
        trace = ((rho0 * s_new + rho1 * nu).astype(s.dtype), (th / rho0 + d_theta / rho1).astype(th.dtype))
        return trace, new, loss, grad

    return Tracker(uoro_init, uoro_advance, unravel_params, unravel_carry)


def _generic(tree, seed):
    """Deterministic generic values in [-0.1, 0.1] shaped like `tree`'s float leaves (cosines of an
    irrational stride, cheaper to compile than a random number generator). Small, so that no
    activation saturates: a saturated tanh has an exactly zero derivative in float32, which would
    read as a structural zero."""
    leaves, structure = jax.tree.flatten(tree)
    out = []
    for i, leaf in enumerate(leaves):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            phase = jnp.arange(leaf.size, dtype=leaf.dtype).reshape(leaf.shape) * 0.6180339887 + (seed * 7.31 + i * 1.37)
            leaf = 0.1 * jnp.cos(phase * 2.7182818)
        out.append(leaf)
    return jax.tree.unflatten(structure, out)


def _pattern(propagate, method: SnAp, theta, c, x, target):
    """SnAp's mask: entries of the exact influence that are non-zero after n steps from zero, at
    `draws` generic points (params, carry and float inputs replaced by generic values; a zero there
    is a structural zero, up to piecewise-linear steps such as ReLU, which the several draws cover)."""
    mask = jnp.zeros((theta.size, c.size), bool)
    for d in range(method.draws):
        theta_r = _generic(theta, 3 * d)

        def one_step(state, seed):
            influence, c_r = state
            influence, c_r, _, _ = propagate(theta_r, influence, c_r, _generic(x, seed), target)
            return (influence, c_r), None

        start = (jnp.zeros_like(mask, c.dtype), _generic(jnp.zeros_like(c), 3 * d + 1))
        seeds = jnp.arange(method.n, dtype=c.dtype) + 3 * d + 2
        (influence, _), _ = lax.scan(one_step, start, seeds)
        mask = mask | (influence != 0)
    return mask


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
            return zero_length_result(0, params, carry, xs, False)
        tracker = make_tracker(step, loss_fn, method, params, carry, max_influence_bytes=max_influence_bytes)
        theta, c = ravel_pytree(params)[0], ravel_pytree(carry)[0]
        first = jax.tree.map(lambda a: a[0], (xs, targets))
        trace = tracker.init(theta, c, *first)
        keys = jax.random.split(key, length) if key is not None else jnp.zeros((length,))

        def body(state, inputs):
            trace, c, loss, grad = state
            x, target, k = inputs
            trace, c, step_loss, step_grad = tracker.advance(theta, trace, c, x, target, k)
            return (trace, c, loss + step_loss.astype(loss.dtype), grad + step_grad), None

        loss0 = jnp.zeros((), jnp.promote_types(theta.dtype, jnp.float32))
        (_, c, loss, grad), _ = lax.scan(body, (trace, c, loss0, jnp.zeros_like(theta)), (xs, targets, keys))
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), tracker.unravel_params(grad), params)
        return (loss, tracker.unravel_carry(c)), grads

    return online_grad_fn
