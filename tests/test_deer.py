"""`deer` (DEER and quasi-DEER) against `lax.scan` of the same step: values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.test_util import check_grads

import jaxbptt as jb

T, D, H = 20, 2, 3


def _problem(cell):
    params = cell.init(jax.random.key(0), D, jnp.float64)
    carry = jax.tree.map(lambda c: c + 0.1, cell.initial_carry((), jnp.float64))
    xs = jax.random.normal(jax.random.key(1), (T, D))
    return params, carry, xs


def _scan(step, params, carry, xs):
    return lax.scan(lambda c, x: step(params, c, x), carry, xs)


def _loss(solve):
    def loss(params, carry, xs):
        final, ys = solve(params, carry, xs)
        w = jnp.sin(jnp.arange(ys.size, dtype=jnp.float64)).reshape(ys.shape)
        return jnp.sum(ys * w) + sum(jnp.sum(c**2) for c in jax.tree.leaves(final))

    return loss


@pytest.mark.parametrize("cell, quasi, tol", [
    (jb.gru(H), False, None),
    (jb.lstm(H), False, None),  # a pytree carry, flattened
    (jb.elman(H), True, 0.0),
])
def test_equals_scan_values_and_gradients(cell, quasi, tol):
    params, carry, xs = _problem(cell)
    solve = lambda p, c, x: jb.deer(cell.step, p, c, x, quasi=quasi, tol=tol)
    got, want = jax.jit(solve)(params, carry, xs), jax.jit(lambda *a: _scan(cell.step, *a))(params, carry, xs)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12), got, want)
    grads = jax.jit(jax.grad(_loss(solve), argnums=(0, 1, 2)))(params, carry, xs)
    grads_ref = jax.jit(jax.grad(_loss(lambda *a: _scan(cell.step, *a)), argnums=(0, 1, 2)))(params, carry, xs)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-11), grads, grads_ref)


def test_iterations_reported_and_max_iters_respected():
    cell = jb.gru(H)
    params, carry, xs = _problem(cell)
    run = jax.jit(lambda p, c, x, **kw: jb.deer(cell.step, p, c, x, return_info=True, **kw), static_argnames=("max_iters",))
    _, ys, info = run(params, carry, xs)
    assert 1 < int(info.iterations) < T and float(info.max_change) < 1e-6
    _, ys_one, one = run(params, carry, xs, max_iters=1)
    assert int(one.iterations) == 1
    _, ys_seq = _scan(cell.step, params, carry, xs)
    np.testing.assert_allclose(ys_one[0], ys_seq[0], rtol=1e-12)  # step 1 is exact after one iteration
    assert float(jnp.max(jnp.abs(ys_one - ys_seq))) > 1e-6


def test_check_grads_and_vmap_over_a_batch():
    cell = jb.elman(H)
    params, carry, xs = _problem(cell)
    f = jax.jit(lambda p, c, x: jb.deer(cell.step, p, c, x)[1])
    check_grads(f, (params, carry, xs[:8]), order=1, modes=["rev"])
    batch = jax.random.normal(jax.random.key(3), (4, T, D))
    got = jax.jit(jax.vmap(lambda x: jb.deer(cell.step, params, carry, x)))(batch)
    want = jax.vmap(lambda x: _scan(cell.step, params, carry, x))(batch)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12), got, want)


def test_zero_length():
    cell = jb.elman(H)
    params, carry, _ = _problem(cell)
    final, ys = jb.deer(cell.step, params, carry, jnp.zeros((0, D)))
    assert ys.shape == (0, H) and np.array_equal(final, carry)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(max_iters=0), ValueError, "max_iters must be None or an int >= 1"),
    (dict(tol=-1.0), ValueError, "tol must be None or a float >= 0"),
    (dict(quasi=1), TypeError, "quasi must be a bool"),
    (dict(return_info="yes"), TypeError, "return_info must be a bool"),
])
def test_option_errors(kwargs, error, match):
    cell = jb.elman(H)
    with pytest.raises(error, match=match):
        jb.deer(cell.step, *_problem(cell), **kwargs)


def test_integer_carry_rejected():
    with pytest.raises(TypeError, match="carry leaf must be a real float"):
        jb.deer(lambda p, c, x: (c + 1, x), None, jnp.zeros(2, jnp.int32), jnp.ones((3, 2)))


def test_split_over_time_on_one_device():
    """`axis_name=` inside `jax.shard_map` on a one-device mesh (8 devices: tests/sharded_check.py):
    quasi-DEER, whose solve is a split `linear_scan`; the final carry and info come back replicated."""
    from jax.sharding import PartitionSpec as P

    cell = jb.elman(H)
    params, carry, xs = _problem(cell)
    mesh = jax.make_mesh((1,), ("time",), axis_types=(jax.sharding.AxisType.Auto,))
    solve = lambda axis_name: lambda p, c, x: jb.deer(cell.step, p, c, x, quasi=True, tol=0.0, axis_name=axis_name)
    split = jax.shard_map(solve("time"), mesh=mesh, in_specs=(P(), P(), P("time")), out_specs=(P(), P("time")))
    grads = lambda f: jax.jit(jax.value_and_grad(_loss(f), argnums=(0, 1, 2)))(params, carry, xs)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-14), grads(split), grads(solve(None)))
    with pytest.raises(ValueError, match=r"deer: axis_name 'time' is not a bound axis name here"):
        solve("time")(params, carry, xs)
