"""Steps that close over traced values differentiate like `lax.scan` with respect to those values."""

import chex
import jax
import jax.numpy as jnp
from jax import lax

import jaxbptt as jb
from steps import problem, scan_loss

def _scaled(step, scale):
    """`step` with its carry multiplied by a closed-over `scale` (a hyperparameter)."""
    return lambda p, c, x: step(p, jax.tree.map(lambda a: a * scale, c), x)

def test_grad_with_respect_to_a_closed_over_value():
    step, _, params, carry, xs, _ = problem("two_layer", T=8, B=2, H=3)
    objective = lambda final, ys: sum(jnp.sum(jnp.sin(a)) for a in jax.tree.leaves((final, ys)))

    def loss(scale, p, unroll):
        return objective(*unroll(_scaled(step, scale), p, carry, xs))

    scan = lambda s, p, c, x: lax.scan(lambda c_, x_: s(p, c_, x_), c, x)
    ref = jax.grad(loss, argnums=(0, 1))(jnp.asarray(0.8), params, scan)
    run = lambda s, p, c, x: jb.unroll(s, p, c, x, remat=4)
    chex.assert_trees_all_close(jax.grad(loss, argnums=(0, 1))(jnp.asarray(0.8), params, run), ref, rtol=1e-10)
    grad_of_jit = jax.grad(jax.jit(loss, static_argnums=2), argnums=(0, 1))
    chex.assert_trees_all_close(grad_of_jit(jnp.asarray(0.8), params, jb.unroll), ref, rtol=1e-10)
    jax.test_util.check_grads(lambda s: loss(s, params, jb.unroll), (jnp.asarray(0.8),), order=1, modes=["rev"])

def test_grad_with_respect_to_resettable_initial_carry():
    step, loss_fn, params, carry, xs, targets = problem("lstm", T=10, B=2, H=3)
    resets = jnp.zeros((10, 2), bool).at[4, 0].set(True).at[7, 1].set(True)
    init = jax.tree.map(lambda a: jnp.full(a.shape[1:], 0.3), carry)

    def loss(init, unroll):
        final, ys = unroll(jb.resettable(step, init), params, carry, (xs, resets))
        return jnp.sum(jax.vmap(loss_fn)(ys, targets)) + sum(jnp.sum(a) for a in jax.tree.leaves(final))

    scan = lambda s, p, c, x: lax.scan(lambda c_, x_: s(p, c_, x_), c, x)
    ref = jax.grad(loss)(init, scan)
    assert float(jnp.abs(ref.h).max()) > 0
    chex.assert_trees_all_close(jax.grad(loss)(init, jb.unroll), ref, rtol=1e-10)

def test_meta_gradient_through_value_and_grad():
    """The gradient of (loss + |grads|^2) with respect to a closed-over value: second order."""
    step, loss_fn, params, carry, xs, targets = problem("elman", T=6, B=2, H=3)

    def meta(scale, value_and_grad):
        (value, _), grads = value_and_grad(_scaled(step, scale))(params, carry, xs, targets)
        return value + sum(jnp.sum(g ** 2) for g in jax.tree.leaves(grads))

    ref = jax.grad(meta)(jnp.asarray(0.9), lambda s: jax.value_and_grad(scan_loss(s, loss_fn), has_aux=True))
    got = jax.grad(meta)(jnp.asarray(0.9), lambda s: jb.value_and_grad(s, loss_fn))
    assert jnp.allclose(got, ref, rtol=1e-10)
