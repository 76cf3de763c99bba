"""NaN policy and the checked mode, mixed precision, integer params."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbptt as jb
from steps import problem, scan_loss


def _rel(a, b):
    return max(float(jnp.linalg.norm(x.astype(jnp.float64) - y.astype(jnp.float64)) / jnp.linalg.norm(y.astype(jnp.float64)))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_nan_propagates_by_default():
    step, loss_fn, params, carry, xs, targets = problem("gru", T=20)
    xs = xs.at[11, 0, 0].set(jnp.nan)
    (loss, final), grads = jb.value_and_grad(step, loss_fn, truncation=4, clip_norm=0.1)(params, carry, xs, targets)
    assert bool(jnp.isnan(loss)) and bool(jnp.any(jnp.isnan(final)))
    assert all(bool(jnp.any(jnp.isnan(g))) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("name", ["lstm", "two_layer"])
def test_checked_mode_names_the_first_bad_step(name):
    step, loss_fn, params, carry, xs, targets = problem(name, T=30)
    checked = jb.value_and_grad(step, loss_fn, check_finite=True, remat=7)
    (loss, _), grads = checked(params, carry, xs, targets)  # clean inputs: the same answer
    np.testing.assert_allclose(loss, jb.value_and_grad(step, loss_fn)(params, carry, xs, targets)[0][0], rtol=1e-12)
    with pytest.raises(Exception, match=r"non-finite carry or output in the forward pass at step 17"):
        checked(params, carry, xs.at[17, 1, 2].set(jnp.nan), targets)
    leaf = jax.tree.leaves(targets)[0]
    bad_targets = jax.tree.unflatten(jax.tree.structure(targets), [leaf.at[22, 0, 1].set(jnp.inf)] + jax.tree.leaves(targets)[1:])
    with pytest.raises(Exception, match=r"non-finite cotangent in the backward pass, of the carry entering step 22"):
        checked(params, carry, xs, bad_targets)


@pytest.mark.parametrize("name", ["elman", "lstm", "gru", "two_layer"])
def test_mixed_precision(name):
    """bfloat16 params and inputs with a float32 carry: gradients in bfloat16, accumulated in
    float32, within 1e-2 of the float64 oracle; an all-bfloat16 run works too."""
    step, loss_fn, params, carry, xs, targets = problem(name, T=60, B=4, H=16)
    bf16 = lambda tree: jax.tree.map(lambda a: a.astype(jnp.bfloat16), tree)
    f32 = lambda tree: jax.tree.map(lambda a: a.astype(jnp.float32), tree)
    p16, x16 = bf16(params), bf16(xs)
    _, grads = jax.jit(jb.value_and_grad(step, loss_fn))(p16, f32(carry), x16, f32(targets))
    assert all(g.dtype == jnp.bfloat16 for g in jax.tree.leaves(grads))
    up = lambda tree: jax.tree.map(lambda a: a.astype(jnp.float64), tree)
    (_, _), oracle = jax.value_and_grad(scan_loss(step, loss_fn), has_aux=True)(up(p16), carry, up(x16), targets)
    assert _rel(grads, oracle) < 1e-2
    _, all16 = jax.jit(jb.value_and_grad(step, loss_fn))(p16, bf16(carry), x16, bf16(targets))
    assert _rel(all16, oracle) < 3e-2


def test_integer_params_are_refused_for_gradients():
    step = lambda p, h, x: (jnp.tanh(h * p["scale"] + x), h)
    with pytest.raises(TypeError, match=r"cannot differentiate with respect to params: params\['scale'\] has dtype int"):
        jb.value_and_grad(step, lambda y, t: jnp.sum(y))({"scale": jnp.asarray(2)}, jnp.zeros(3), jnp.ones((4, 3)), jnp.ones(4))
    # but an integer hyperparameter not differentiated is fine in unroll
    final, _ = jb.unroll(step, {"scale": jnp.asarray(2)}, jnp.zeros(3), jnp.ones((4, 3)))
    assert final.shape == (3,)
