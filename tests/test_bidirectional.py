"""bidirectional against a jax.grad reference; learnable initial states."""

import chex
import jax
import jax.numpy as jnp
import pytest
from jax import lax

import jaxbptt as jb
from steps import problem


def _setup():
    fwd, bwd = jb.lstm(4), jb.gru(3)
    params = (fwd.init(jax.random.key(0), 3, jnp.float64), bwd.init(jax.random.key(1), 3, jnp.float64))
    carries = (jax.tree.map(lambda a: a + 0.1, fwd.initial_carry((2,), jnp.float64)), bwd.initial_carry((2,), jnp.float64))
    xs = jax.random.normal(jax.random.key(2), (13, 2, 3))
    return fwd, bwd, params, carries, xs


def test_matches_scan_reference():
    fwd, bwd, params, carries, xs = _setup()

    def reference(params, carries, xs):
        f, ys_f = lax.scan(lambda c, x: fwd.step(params[0], c, x), carries[0], xs)
        b, ys_b = lax.scan(lambda c, x: bwd.step(params[1], c, x), carries[1], xs, reverse=True)
        return (f, b), jnp.concatenate([ys_f, ys_b], -1)

    objective = lambda run: lambda p, c, x: jnp.sum(jnp.sin(run(p, c, x)[1]) * jnp.arange(13.0)[:, None, None])
    ours = lambda p, c, x: jb.bidirectional(fwd.step, bwd.step, p, c, x)
    chex.assert_trees_all_close(ours(params, carries, xs), reference(params, carries, xs), rtol=1e-12)
    g = jax.jit(jax.grad(objective(ours), argnums=(0, 1, 2)))(params, carries, xs)
    ref = jax.grad(objective(reference), argnums=(0, 1, 2))(params, carries, xs)
    chex.assert_trees_all_close(g, ref, rtol=1e-10, atol=1e-13)


def test_options_and_merge():
    fwd, bwd, params, carries, xs = _setup()
    run = lambda **o: jax.grad(lambda p: jnp.sum(jb.bidirectional(fwd.step, bwd.step, p, carries, xs,
                                                                  merge=lambda a, b: a[..., :3] * b, **o)[1]))(params)
    chex.assert_trees_all_close(run(remat=4), run(), rtol=1e-12, atol=1e-14)
    assert not jnp.allclose(run(truncation=2)[0]["W_h"], run()[0]["W_h"])
    with pytest.raises(ValueError, match=r"bidirectional needs params as a pair \(forward, backward\)"):
        jb.bidirectional(fwd.step, bwd.step, params[0], carries, xs)


def test_learnable_initial_state_recipe():
    """The README recipe: keep h0 in the params, broadcast it over the batch inside the loss."""
    step, loss_fn, params, carry, xs, targets = problem("gru", T=15)
    params = {"model": params, "h0": jnp.full((5,), 0.2)}

    def loss_with(value_and_grad):
        def loss(params):
            h0 = jnp.broadcast_to(params["h0"], carry.shape)
            (value, _), (g_model, g_carry) = value_and_grad(params["model"], h0)
            return value, {"model": g_model, "h0": jnp.sum(g_carry, axis=0)}  # chain rule of the broadcast
        return loss

    ours = loss_with(lambda p, c: jb.value_and_grad(step, loss_fn, argnums=(0, 1))(p, c, xs, targets))
    _, grads = jax.jit(ours)(params)

    def plain(params):
        h0 = jnp.broadcast_to(params["h0"], carry.shape)
        _, ys = lax.scan(lambda c, x: step(params["model"], c, x), h0, xs)
        return jnp.sum(jax.vmap(loss_fn)(ys, targets))

    chex.assert_trees_all_close(grads, jax.grad(plain)(params), rtol=1e-10, atol=1e-13)
