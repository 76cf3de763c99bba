"""`online_grad`: gradients computed forward in time beside BPTT -- RTRL, SnAp-n and UORO, and the
perturbation estimators ES, PES and NRES (`perturb.py`).

Each influence method carries forward an estimate of the influence `J_t = d carry_t / d params`
and adds, at every step, `dL_t/dparams ~= dL_t/dparams|immediate + dL_t/dcarry_{t-1} . J_{t-1}`
(and, for a final loss, `dF/dcarry_T . J_T`). Parameters and carries of any pytree structure are
flattened with `ravel_pytree`: the carry is one vector (batch included), so RTRL's influence has
|carry| rows -- for a carry of B examples of H units, B blocks of H x |params|, one per example,
since examples do not interact. SnAp stores only its pattern's entries where that is cheaper; UORO
keeps one rank-one estimate per example.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.flatten_util import ravel_pytree

from .. import _validate as v
from .._core.api import value_and_grad
from .._types import LossFn, StepFn
from .._core import call as calls
from .call import check_stream, losses, per_step
from .perturb import PERTURBATIONS, sequence_grad
from .structure import Sparse, examples, pattern, sparse_recursion

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
    immediate Jacobian `I` and of the carry Jacobian `D`, read from the step's operations (a ReLU
    unit, a `where`, an embedding lookup by integer ids count with every input they can reach for
    some data, whatever the data at hand; a `custom_vjp` function as dense; a `while_loop` on the
    carry is refused) and evaluated at `draws` small deterministic generic points, OR'ed, against
    entries that vanish at one point by chance; then `M_1 = pattern(I)`,
    `M_{k+1} = M_1 | M_k pattern(D)^T`. SnAp(1) equals RTRL when the carry Jacobian is diagonal.

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


METHODS = (RTRL, SnAp, UORO, TBPTT) + PERTURBATIONS
KEYED = (UORO,) + PERTURBATIONS  # the methods that draw random numbers


def check_method(method) -> None:
    if not isinstance(method, METHODS):
        raise TypeError("method must be one of jb.RTRL(), jb.SnAp(n), jb.UORO(), jb.TBPTT(k1, k2), jb.ES(sigma), "
                        f"jb.PES(sigma), jb.NRES(sigma); got {method!r}.")
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
    `contract(trace, g_c)` is `g_c . J`, the gradient of a loss of the current carry whose
    gradient with respect to the flat carry is `g_c`; `unravel_*` convert the flat vectors back
    to pytrees. The trace is a pytree of float arrays whose zero is the state of a new sequence;
    index tables are static, closed over."""

    init: Callable
    advance: Callable
    contract: Callable
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

    def dense_contract(influence, g_c):
        return (influence @ g_c.astype(influence.dtype)).astype(theta0.dtype)

    if isinstance(method, (RTRL, SnAp)):
        mask = None
        if isinstance(method, SnAp):
            mask, carry_pattern = pattern(flat_step, method.n, method.draws, theta0, c0, x)
            sparse = Sparse.build(mask, carry_pattern)
            if sparse.cheaper_than_dense():
                init, advance, contract = sparse_recursion(flat_step, step_and_loss, sparse)
                return Tracker(init, advance, contract, unravel_params, unravel_carry)

        def rtrl_advance(theta, influence, c, x, target, key):
            (new, loss), lin = jax.linearize(step_and_loss(x, target), theta, c)
            eye = jnp.eye(n_params, dtype=theta.dtype)
            # row p: the tangent of (carry, loss) along theta_p, with the carry's tangent J_{t-1}[p]
            new_influence, grad = jax.vmap(lin)(eye, influence)
            if mask is not None:
                new_influence = jnp.where(mask, new_influence, 0)
            # inputs of a wider dtype than params or carry must not widen the recursion's state
            return new_influence.astype(influence.dtype), new, loss, grad.astype(theta.dtype)

        return Tracker(lambda theta, c: jnp.zeros((n_params, n_carry), c.dtype), rtrl_advance, dense_contract,
                       unravel_params, unravel_carry)

    ids, n_blocks = examples(flat_step, carry, theta0, c0, x)
    block_masks = jnp.asarray(ids[None] == np.arange(n_blocks)[:, None])

    def block_norms(a):
        return jnp.sqrt(jax.ops.segment_sum(a * a, ids, n_blocks))

    def uoro_init(theta, c):
        return jnp.zeros_like(c), jnp.zeros((n_blocks, theta.size), theta.dtype)

    def uoro_contract(trace, g_c):
        s, th = trace
        return (jax.ops.segment_sum(g_c * s, ids, n_blocks) @ th).astype(theta0.dtype)

    def uoro_advance(theta, trace, c, x, target, key):
        s, th = trace
        eps = method.eps
        (new, loss), vjp = jax.vjp(step_and_loss(x, target), theta, c)
        g_theta, g_c = vjp((jnp.zeros_like(new), jnp.ones_like(loss)))
        grad = (g_theta + uoro_contract(trace, g_c)).astype(theta.dtype)
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

    return Tracker(uoro_init, uoro_advance, uoro_contract, unravel_params, unravel_carry)


def online_grad(
    step: StepFn,
    loss_fn: Optional[LossFn],
    method,
    *,
    final_loss: Optional[Callable] = None,
    max_influence_bytes: int = DEFAULT_MAX_INFLUENCE_BYTES,
) -> Callable:
    """The sequence loss and an online estimate of its parameter gradient, computed forward in time.

    The loss is `L = sum_t loss_fn(y_t, target_t) + final_loss(final_carry)` (either part may be
    left out). With the parameters held fixed over the sequence, the influence methods return
    `sum_t g_t + g_F`, where `g_t` is the method's estimate of `dL_t/dparams` formed at step t from
    what is known at step t and `g_F = dF/dcarry_T . influence_T` that of the final loss::

      trace = zero influence; g = 0
      for t in range(T):
        carry, y_t = step(params, carry, xs[t])
        g += dL_t/dparams|immediate + dL_t/dcarry_{t-1} . influence_{t-1}  (the method's estimate)
        trace = the method's influence update
      g += dF/dcarry_T . influence_T

    `jb.RTRL()` gives exact BPTT's gradient; `jb.SnAp(n)` a sparse approximation; `jb.UORO()` an
    unbiased rank-one estimate; `jb.TBPTT(k1, k2)` is `value_and_grad(..., truncation=(k1, k2))`
    (the final loss an error of the last chunk), for comparison under one API. The perturbation
    estimators `jb.ES(sigma, pairs)`, `jb.PES(sigma, pairs, window)`, `jb.NRES(sigma, pairs, window)`
    evaluate the step forward only, `2 pairs + 1` runs vmapped (the loss and final carry returned
    are the unperturbed run's): ES over the whole sequence; PES and NRES window by window (see their
    docstrings), the final loss counted in the last window. Time is the leading axis of `xs` and
    `targets`.

    Args:
      step: `step(params, carry, x) -> (carry, y)`; `y` may be None when `loss_fn` is None. For the
        influence methods params and carry leaves must be floats; the perturbation estimators
        need float params only, and never differentiate the step (rounding or sampling inside it
        is fine).
      loss_fn: `loss_fn(y_t, target_t) -> scalar`, or None for no per-step loss.
      method: `jb.RTRL()`, `jb.SnAp(n)`, `jb.UORO()`, `jb.TBPTT(k1, k2)`, `jb.ES(...)`,
        `jb.PES(...)` or `jb.NRES(...)`.
      final_loss: `final_loss(final_carry) -> scalar`, a loss of the carry after the last step
        (the meta-objective of an unrolled optimisation: the validation loss of trained weights);
        None for none. `loss_fn` and `final_loss` cannot both be None.
      max_influence_bytes: RTRL and SnAp refuse (ValueError, with the size) a step whose influence
        matrix, |carry| x |params| entries plus the |params| x |params| identity its forward-mode
        columns start from, would exceed this many bytes (default 1 GiB).

    Returns:
      A function `(params, carry, xs, targets=None, key=None) -> ((loss, final_carry), grads)`,
      `grads` shaped like `params`; `targets` may be None (then each step's target is None);
      UORO, ES, PES and NRES need `key`.

    Raises:
      TypeError / ValueError: at trace time, for a method that is not one of these, a random
        method called without `key`, an influence above `max_influence_bytes`, non-float params
        (or carry leaves, for the influence methods), no loss at all, a final loss that is not a
        float scalar, and the checks of `value_and_grad`.

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

    A loss of the final state only, estimated by persistent ES over windows of 5 steps:

      >>> energy = lambda h: jnp.sum(h ** 2)
      >>> pes = jb.online_grad(model.step, None, jb.PES(0.01, pairs=8, window=5), final_loss=energy)
      >>> (loss, final), grads = pes(params, model.initial_carry((3,)), xs, key=jax.random.key(1))
      >>> bool(jnp.isclose(loss, energy(final)))
      True
    """
    v.check_callable("step", step)
    spec = losses(loss_fn, final_loss)
    check_method(method)
    check_max_bytes(max_influence_bytes)

    def online_grad_fn(params, carry, xs, targets=None, key=None):
        if isinstance(method, KEYED) and key is None:
            raise ValueError(f"online_grad with method=jb.{type(method).__name__}(...) needs key=jax.random.key(...) "
                             "(its random numbers); got key=None.")
        if isinstance(method, TBPTT):
            return value_and_grad(step, loss_fn, truncation=(method.k1, method.k2), final_loss=final_loss)(
                params, carry, xs, targets)
        call = check_stream(step, spec, params, carry, xs, targets)
        length, carry, loss_type = call.length, call.carry, call.loss_dtype
        if length == 0:
            result = calls.zero_length(call)
            return (result.loss, result.final), result.grads[0]
        if isinstance(method, PERTURBATIONS):
            theta, unravel = ravel_pytree(params)
            loss, carry, grad = sequence_grad(method, step, loss_fn, final_loss, theta, unravel, carry, xs, targets,
                                              key, length, loss_type)
            return (loss, carry), jax.tree.map(lambda g, p: g.astype(p.dtype), unravel(grad), params)
        tracker = make_tracker(step, per_step(loss_fn, loss_type), method, params, carry, v.first_step(xs),
                               max_influence_bytes=max_influence_bytes)
        theta, c = ravel_pytree(params)[0], ravel_pytree(carry)[0]
        keys = jax.random.split(key, length) if key is not None else jnp.zeros((length,))

        def body(state, inputs):
            trace, c, loss, grad = state
            x, target, k = inputs
            trace, c, step_loss, step_grad = tracker.advance(theta, trace, c, x, target, k)
            return (trace, c, loss + step_loss, grad + step_grad), None

        start = (tracker.init(theta, c), c, jnp.zeros((), loss_type), jnp.zeros_like(theta))
        (trace, c, loss, grad), _ = lax.scan(body, start, (xs, targets, keys))
        loss, grad = final_through_influence(tracker, final_loss, trace, c, loss, grad)
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), tracker.unravel_params(grad), params)
        return (loss, tracker.unravel_carry(c)), grads

    return online_grad_fn


def final_through_influence(tracker, final_loss, trace, c, loss, grad):
    """The final loss of the flat carry `c` and its gradient through the influence `trace`."""
    if final_loss is None:
        return loss, grad
    value, g_c = jax.value_and_grad(lambda cc: final_loss(tracker.unravel_carry(cc)))(c)
    return loss + value.astype(loss.dtype), grad + tracker.contract(trace, g_c)
