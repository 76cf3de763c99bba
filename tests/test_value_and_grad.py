"""Exact BPTT through jb.value_and_grad against jax.grad through lax.scan and a Python loop."""

import chex
import jax
import jax.numpy as jnp
import pytest

import jaxbptt as jb
from steps import CELLS, USER_STEPS, loop_loss, problem, scan_loss

ALL = CELLS + ("bare_gru",) + USER_STEPS
ARGNUMS = (0, 1, 2)


def _reference(step, loss_fn, loss_impl=scan_loss):
    return jax.value_and_grad(loss_impl(step, loss_fn), argnums=ARGNUMS, has_aux=True)


LONG = ("lstm", "gru", "two_layer", "tuple")  # test_long_sequence runs these at T=301


# every step at T=2; one step (T=1) for the hand-written kernels and the generic path; T=23 for the
# steps that test_long_sequence leaves out
@pytest.mark.parametrize("name, T", [(name, 2) for name in ALL]
                         + [(name, 1) for name in ("elman", "lstm", "gru", "two_layer")]
                         + [(name, 23) for name in ALL if name not in LONG])
def test_matches_scan_and_loop(name, T):
    step, loss_fn, *args = problem(name, T)
    (loss, final), grads = jax.jit(jb.value_and_grad(step, loss_fn, argnums=ARGNUMS))(*args)
    # the Python loop checks the lax.scan surrogate itself; short sequences suffice for that
    for impl in (scan_loss, loop_loss) if T <= 2 else (scan_loss,):
        (ref_loss, ref_final), ref_grads = jax.jit(_reference(step, loss_fn, impl))(*args)
        chex.assert_trees_all_close(loss, ref_loss, rtol=1e-12)
        chex.assert_trees_all_close(final, ref_final, rtol=1e-12)
        chex.assert_trees_all_close(grads, ref_grads, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("name", LONG)
def test_long_sequence(name):
    step, loss_fn, *args = problem(name, T=301, B=2)
    (loss, _), grads = jax.jit(jb.value_and_grad(step, loss_fn, argnums=ARGNUMS))(*args)
    (ref_loss, _), ref_grads = jax.jit(_reference(step, loss_fn))(*args)
    chex.assert_trees_all_close(loss, ref_loss, rtol=1e-12)
    chex.assert_trees_all_close(grads, ref_grads, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("name", ["elman", "dict_input"])
def test_without_jit(name):
    step, loss_fn, *args = problem(name, T=7)
    (loss, _), grads = jb.value_and_grad(step, loss_fn, argnums=ARGNUMS)(*args)
    (ref_loss, _), ref_grads = _reference(step, loss_fn)(*args)
    chex.assert_trees_all_close(grads, ref_grads, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("name", ["lstm", "two_layer"])
def test_vmap_over_parameter_sets(name):
    step, loss_fn, params, carry, xs, targets = problem(name, T=11)
    stacked = jax.tree.map(lambda a: jnp.stack([a, 0.5 * a, -a]), params)
    f = jax.jit(jax.vmap(jb.value_and_grad(step, loss_fn), in_axes=(0, None, None, None)))
    (losses, _), grads = f(stacked, carry, xs, targets)
    for i in range(3):
        p = jax.tree.map(lambda a: a[i], stacked)
        (ref_loss, _), ref_grads = jax.value_and_grad(scan_loss(step, loss_fn), has_aux=True)(p, carry, xs, targets)
        chex.assert_trees_all_close(losses[i], ref_loss, rtol=1e-12)
        chex.assert_trees_all_close(jax.tree.map(lambda a: a[i], grads), ref_grads, rtol=1e-10, atol=1e-13)


def test_argnums_structure():
    step, loss_fn, *args = problem("elman", T=5)
    _, g0 = jb.value_and_grad(step, loss_fn)(*args)
    _, (g1,) = jb.value_and_grad(step, loss_fn, argnums=(1,))(*args)
    _, (g2, g0b) = jb.value_and_grad(step, loss_fn, argnums=(2, 0))(*args)
    chex.assert_trees_all_equal_structs(g0, args[0])
    chex.assert_trees_all_equal_structs(g1, args[1])
    chex.assert_trees_all_equal_structs(g2, args[2])
    chex.assert_trees_all_close(g0, g0b, rtol=1e-14)


def test_unbatched_and_multi_batch_dims():
    for B in (0, 2):
        step, loss_fn, params, carry, xs, targets = problem("lstm", T=9, B=B)
        if B:  # two leading batch dims
            xs = jnp.stack([xs, 2 * xs], axis=1)
            targets = jnp.stack([targets, -targets], axis=1)
            carry = jax.tree.map(lambda a: jnp.stack([a, a]), carry)
        (loss, _), grads = jax.jit(jb.value_and_grad(step, loss_fn, argnums=ARGNUMS))(params, carry, xs, targets)
        (ref, _), ref_grads = jax.value_and_grad(scan_loss(step, loss_fn), argnums=ARGNUMS, has_aux=True)(
            params, carry, xs, targets)
        chex.assert_trees_all_close(grads, ref_grads, rtol=1e-10, atol=1e-13)


def test_float32_close_to_float64():
    step, loss_fn, *args64 = problem("gru", T=40, dtype=jnp.float64)
    args32 = jax.tree.map(lambda a: a.astype(jnp.float32), args64)
    _, g32 = jax.jit(jb.value_and_grad(step, loss_fn))(*args32)
    _, g64 = jax.jit(jb.value_and_grad(step, loss_fn))(*args64)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(g32))
    chex.assert_trees_all_close(g32, jax.tree.map(lambda a: a.astype(jnp.float32), g64), rtol=2e-4, atol=1e-5)


def test_zero_length_sequence_is_exact():
    step, loss_fn, params, carry, xs, targets = problem("elman", T=0)
    (loss, final), grads = jb.value_and_grad(step, loss_fn, argnums=ARGNUMS)(params, carry, xs, targets)
    assert float(loss) == 0.0
    chex.assert_trees_all_equal(final, carry)
    chex.assert_trees_all_equal(grads, jax.tree.map(jnp.zeros_like, (params, carry, xs)))


def test_integer_inputs_are_not_differentiated():
    """An embedding lookup inside the step: integer token inputs, float gradients elsewhere."""

    def step(p, h, tok):
        h = jnp.tanh(p["E"][tok] + h @ p["W"])
        return h, h

    key = jax.random.key(3)
    params = {"E": jax.random.normal(key, (7, 4)), "W": 0.5 * jnp.eye(4)}
    toks = jax.random.randint(key, (12, 2), 0, 7)
    targets = jnp.ones((12, 2, 4))
    (loss, _), g = jax.jit(jb.value_and_grad(step, jb_mse := lambda y, t: jnp.mean((y - t) ** 2)))(
        params, jnp.zeros((2, 4)), toks, targets)
    (_, _), ref = jax.value_and_grad(scan_loss(step, jb_mse), has_aux=True)(params, jnp.zeros((2, 4)), toks, targets)
    chex.assert_trees_all_close(g, ref, rtol=1e-10)


def test_integer_carry_leaf():
    """A step counter in the carry: the engine carries no adjoint for it."""

    def step(p, c, x):
        h, n = c
        h = jnp.tanh(x @ p + h * (n % 2).astype(h.dtype))
        return (h, n + 1), h

    p = jax.random.normal(jax.random.key(0), (3, 3))
    args = (p, (jnp.ones((2, 3)), jnp.asarray(0, jnp.int32)), jnp.ones((9, 2, 3)), jnp.zeros((9, 2, 3)))
    (loss, final), g = jax.jit(jb.value_and_grad(step, lambda y, t: jnp.sum((y - t) ** 2)))(*args)
    (_, ref_final), ref = jax.value_and_grad(scan_loss(step, lambda y, t: jnp.sum((y - t) ** 2)), has_aux=True)(*args)
    assert int(final[1]) == 9
    chex.assert_trees_all_close(g, ref, rtol=1e-10)


def test_check_grads_reports_and_raises():
    step, loss_fn, *args = problem("two_layer", T=15)
    assert jb.check_grads(step, loss_fn, *args, argnums=ARGNUMS) < 1e-12
    with_aux = lambda y, t: (loss_fn(y, t), {"y": jnp.sum(y)})
    assert jb.check_grads(step, with_aux, *args, has_aux=True, diagnostics=True, clip_norm=0.1) < 1e-12

    # An engine with a wrong backward formula must be caught, naming a gradient leaf.
    cell = jb.elman(5)
    kernel = cell.step.make_kernel(None, None, None)
    off = kernel._replace(backward=lambda *a: jax.tree.map(lambda v: 1.01 * v, kernel.backward(*a)))
    wrong = jb.Step(cell.step, lambda *a: off)
    params = cell.init(jax.random.key(0), 4, jnp.float64)
    xs, targets = jnp.ones((6, 2, 4)), jnp.zeros((6, 2, 5))
    with pytest.raises(AssertionError, match=r"gradient grads\['W_"):
        jb.check_grads(wrong, loss_fn, params, cell.initial_carry((2,), jnp.float64), xs, targets)
