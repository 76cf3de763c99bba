"""Built-in cells: initialisation, shapes and dtypes, and each hand-derived kernel against
jax.vjp of the plain step it belongs to."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbptt as jb
from steps import two_layer_init, two_layer_step

CELLS = {
    "elman": lambda h: jb.elman(h),
    "relu": lambda h: jb.elman(h, activation="relu", recurrent_init="identity"),
    "lstm": lambda h: jb.lstm(h),
    "gru": lambda h: jb.gru(h),
}


@pytest.mark.parametrize("name", CELLS)
@pytest.mark.parametrize("batch", [(), (3,), (2, 3)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_shapes_and_dtypes(name, batch, dtype):
    cell = jb.with_readout(CELLS[name](6), 2)
    params = cell.init(jax.random.key(0), 4, dtype)
    assert all(p.dtype == dtype for p in jax.tree.leaves(params))
    carry = cell.initial_carry(batch, dtype)
    chex.assert_tree_shape_prefix(carry, batch)
    new_carry, y = cell.step(params, carry, jnp.ones(batch + (4,), dtype))
    chex.assert_trees_all_equal_shapes_and_dtypes(new_carry, carry)
    assert y.shape == batch + (2,) and y.dtype == dtype


def test_elman_initialisations():
    key = jax.random.key(1)
    irnn = jb.elman(8, activation="relu", recurrent_init="identity").init(key, 3)
    np.testing.assert_array_equal(irnn["W_hh"], np.eye(8))
    assert float(jnp.std(irnn["W_xh"])) < 1e-2
    ortho = jb.elman(8).init(key, 3)["W_hh"]
    np.testing.assert_allclose(ortho @ ortho.T, np.eye(8), atol=1e-5)
    big = jb.elman(64, recurrent_init="normal", recurrent_scale=3.0).init(key, 3)["W_hh"]
    radius = float(jnp.max(jnp.abs(jnp.linalg.eigvals(big))))
    assert 2.0 < radius < 4.0  # ~ scale for N(0, scale^2 / H) entries


def test_lstm_forget_bias():
    b = jb.lstm(5, forget_bias=2.5).init(jax.random.key(0), 3)["b"]
    np.testing.assert_array_equal(b[5:10], 2.5)
    np.testing.assert_array_equal(jnp.concatenate([b[:5], b[10:]]), 0.0)
    with pytest.raises(TypeError, match=r"forget_bias must be a real number .*; got forget_bias='x' of type str"):
        jb.lstm(4, forget_bias="x")


@pytest.mark.parametrize("name", CELLS)
def test_kernel_matches_plain_step(name):
    """forward equals the plain step; backward and grads equal jax.vjp of it, step by step."""
    cell = CELLS[name](5)
    key = jax.random.key(2)
    params = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(key, a.shape, jnp.float64),
                          cell.init(key, 3, jnp.float64))
    kernel = cell.step.make_kernel(params, None, None)
    carry = jax.tree.map(lambda a: a + 0.3, cell.initial_carry((2,), jnp.float64))
    x = jax.random.normal(key, (2, 3), jnp.float64)
    u = kernel.project(params, x[None])[0]
    new_carry, out, res = kernel.forward(params, (), carry, u)
    ref_carry, ref_y = cell.step(params, carry, x)
    chex.assert_trees_all_close((new_carry, out), (ref_carry, ref_y), rtol=1e-13)

    ct_carry = jax.tree.map(lambda a: jnp.cos(a), ref_carry)
    ct_out = jnp.sin(ref_y)
    _, vjp_fn = jax.vjp(cell.step, params, carry, x)
    ref_dparams, ref_dcarry, ref_dx = vjp_fn((ct_carry, ct_out))
    prev_out = kernel.previous_out(carry)
    dcarry, local = kernel.backward(params, (), out, prev_out, res, ct_carry, ct_out)
    chex.assert_trees_all_close(dcarry, ref_dcarry, rtol=1e-12)
    stack = lambda t: jax.tree.map(lambda a: a[None], t)
    dparams, dus = kernel.grads(params, (), carry, u[None], out[None], stack(prev_out), stack(res), stack(local))
    _, project_vjp = jax.vjp(kernel.project, params, x[None])
    dparams_proj, dx = project_vjp(dus)
    chex.assert_trees_all_close(jax.tree.map(jnp.add, dparams, dparams_proj), ref_dparams, rtol=1e-12)
    chex.assert_trees_all_close(dx[0], ref_dx, rtol=1e-12)


def test_readout_over_a_user_cell():
    """with_readout composes with any cell; the user cell takes the generic path."""
    h = 4
    user = jb.Cell(
        init=lambda key, d, dtype=jnp.float32: jax.tree.map(lambda a: a.astype(dtype), two_layer_init(key, d, h, o=h)),
        initial_carry=lambda batch=(), dtype=jnp.float32: {"h1": jnp.zeros(batch + (h,), dtype),
                                                           "h2": jnp.zeros(batch + (h,), dtype)},
        step=two_layer_step,
    )
    model = jb.with_readout(user, 2)
    params = model.init(jax.random.key(0), 3, jnp.float64)
    xs, targets = jax.random.normal(jax.random.key(1), (9, 2, 3)), jnp.zeros((9, 2, 2))
    err = jb.check_grads(model.step, lambda y, t: jnp.sum((y - t) ** 2), params, model.initial_carry((2,), jnp.float64),
                         xs, targets, argnums=(0, 1, 2), rtol=1e-10)
    assert err < 1e-10
    with pytest.raises(TypeError, match=r"with_readout needs a Cell as cell .*; got 'notacell' of type str"):
        jb.with_readout("notacell", 2)
    without_readout = {k: v for k, v in params.items() if k != "W_hy"}
    with pytest.raises(TypeError, match=r"params must be the with_readout cell's params .* keys \['W_hy', 'b_y', "
                                        r"'cell'\]; got keys \['b_y', 'cell'\]"):
        jb.unroll(model.step, without_readout, model.initial_carry((2,), jnp.float64), xs)
