"""jb.unroll: forward values and the custom VJP of any downstream function."""

import chex
import jax
import jax.numpy as jnp
import pytest
from jax import lax
from jax.test_util import check_grads

import jaxbptt as jb
from steps import problem


def downstream(final, ys):
    """Non-additive in time: a product of per-step terms, plus a nonlinear use of the final carry."""
    leaves = jax.tree.leaves(ys)
    per_step = sum(jnp.sum(jnp.tanh(a).reshape(a.shape[0], -1), axis=1) for a in leaves)
    return jnp.prod(1 + 0.1 * per_step) + jnp.sum(jnp.sin(sum(jnp.sum(c) for c in jax.tree.leaves(final))))


def _objective(run, step):
    def f(params, carry, xs):
        final, ys = run(step, params, carry, xs)
        return downstream(final, ys)

    return f


def _scan(step, params, carry, xs, reverse=False):
    return lax.scan(lambda c, x: step(params, c, x), carry, xs, reverse=reverse)


@pytest.mark.parametrize("name", ["elman", "lstm", "gru", "two_layer", "tuple", "dict_input"])
def test_grad_of_nonadditive_function(name):
    step, _, params, carry, xs, _ = problem(name, T=17)
    g = jax.jit(jax.grad(_objective(jb.unroll, step), argnums=(0, 1, 2)))(params, carry, xs)
    ref = jax.grad(_objective(_scan, step), argnums=(0, 1, 2))(params, carry, xs)
    chex.assert_trees_all_close(g, ref, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("name", ["lstm", "two_layer"])
def test_forward_values_match_scan(name):
    step, _, params, carry, xs, _ = problem(name, T=13)
    out = jax.jit(lambda *a: jb.unroll(step, *a))(params, carry, xs)
    under_grad = jax.jit(lambda *a: jax.vjp(lambda p: jb.unroll(step, p, *a[1:]), a[0])[0])(params, carry, xs)
    ref = _scan(step, params, carry, xs)
    chex.assert_trees_all_close(out, ref, rtol=1e-12, atol=1e-15)
    chex.assert_trees_all_close(under_grad, ref, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", ["gru", "tuple"])
def test_check_grads_reverse_mode(name):
    step, _, params, carry, xs, _ = problem(name, T=6, B=2, H=3)
    f = lambda p, c, x: downstream(*jb.unroll(step, p, c, x))
    check_grads(f, (params, carry, xs), order=1, modes=["rev"])


def test_reverse_and_unroll_options():
    step, _, params, carry, xs, _ = problem("lstm", T=10)
    for unroll in (1, 3):
        g = jax.grad(_objective(lambda *a: jb.unroll(*a, reverse=True, unroll=unroll), step))(params, carry, xs)
        ref = jax.grad(_objective(lambda *a: _scan(*a, reverse=True), step))(params, carry, xs)
        chex.assert_trees_all_close(g, ref, rtol=1e-10, atol=1e-13)


def test_vmap_of_grad():
    step, _, params, carry, xs, _ = problem("elman", T=8)
    batch = jnp.stack([xs, 2 * xs, -xs])
    g = jax.jit(jax.vmap(jax.grad(_objective(jb.unroll, step)), in_axes=(None, None, 0)))(params, carry, batch)
    for i in range(3):
        ref = jax.grad(_objective(_scan, step))(params, carry, batch[i])
        chex.assert_trees_all_close(jax.tree.map(lambda a: a[i], g), ref, rtol=1e-10, atol=1e-13)


def test_forward_mode_is_refused():
    step, _, params, carry, xs, _ = problem("elman", T=4)
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(lambda p: jb.unroll(step, p, carry, xs)[1], (params,), (params,))


def test_zero_length():
    step, _, params, carry, xs, _ = problem("gru", T=0)
    final, ys = jb.unroll(step, params, carry, xs)
    chex.assert_trees_all_equal(final, carry)
    assert ys.shape == (0, 3, 3)
