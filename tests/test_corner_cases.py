"""Unusual but valid inputs and option combinations: each must give the exact answer or a clear
error naming the argument."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbptt as jb
from steps import mse

CELL = jb.elman(4)


def _args(T=10, dtype=jnp.float64):
    params = jax.tree.map(lambda a: a.astype(dtype), CELL.init(jax.random.key(0), 3))
    xs = jax.random.normal(jax.random.key(1), (T, 2, 3), dtype)
    targets = 0.1 * jax.random.normal(jax.random.key(2), (T, 2, 4), dtype)
    return params, jnp.zeros((2, 4), dtype), xs, targets


def _close(a, b, rtol=1e-10):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=1e-12)


@pytest.mark.parametrize("k", [jnp.int64(2**63 - 1), jnp.int32(2**31 - 1)])
def test_traced_truncation_at_least_length_is_exact(k):
    args = _args()
    exact = jb.value_and_grad(CELL.step, mse, argnums=(0, 1, 2))(*args)[1]
    f = jax.jit(lambda k: jb.value_and_grad(CELL.step, mse, argnums=(0, 1, 2), truncation=k)(*args)[1])
    _close(f(k), exact)
    final_grad = jax.jit(jax.grad(lambda p, k: jnp.sum(jb.unroll(CELL.step, p, args[1], args[2], truncation=k)[1])))
    _close(final_grad(args[0], k), jax.grad(lambda p: jnp.sum(jb.unroll(CELL.step, p, args[1], args[2])[1]))(args[0]))


def test_check_grads_fails_on_nan_naming_the_leaf():
    def step(p, c, x):  # d sqrt(v) / dv is infinite at v = 0: a non-finite gradient leaf
        return c + jnp.sqrt(p["v"]), c * p["w"] + x

    params, carry = {"v": jnp.zeros(()), "w": jnp.ones(())}, jnp.zeros((2,))
    xs = jnp.ones((4, 2))
    with pytest.raises(AssertionError, match=r"grads\['v'\].*nan"):
        jb.check_grads(step, mse, params, carry, xs, jnp.zeros((4, 2)))


def _explode(p, c, x):
    return p * c + x, c


@pytest.mark.parametrize("clip_norm", [None, 1.0])
def test_float32_norms_do_not_overflow(clip_norm):
    # Cotangent norms exceed 1e20: their squares overflow float32, the norms themselves do not.
    loss = lambda y, t: 1e20 * jnp.sum(y * t)
    results = []
    for dtype in (jnp.float32, jnp.float64):
        args = (jnp.asarray(1e3, dtype), jnp.ones((2, 4), dtype), jnp.ones((4, 2, 4), dtype), jnp.ones((4, 2, 4), dtype))
        f = jb.value_and_grad(_explode, loss, argnums=(0, 1), diagnostics=True, clip_norm=clip_norm)
        (_, _, diag), grads = f(*args)
        results.append((diag.adjoint_norm, grads[1]))
    (norm32, dcarry32), (norm64, dcarry64) = results
    assert float(jnp.max(norm64)) > 1e20 and bool(jnp.all(jnp.isfinite(norm32)))
    np.testing.assert_allclose(norm32, norm64, rtol=1e-5)
    np.testing.assert_allclose(dcarry32, dcarry64, rtol=1e-5)
    if clip_norm is not None:
        np.testing.assert_allclose(jnp.linalg.norm(dcarry32), 1.0, rtol=1e-5)


@pytest.mark.parametrize("truncation", [(2, 4), 3])
def test_second_derivatives_through_inactive_clipping_are_finite(truncation):
    params, carry, xs, targets = _args()
    targets = targets.at[3:7].set(0.0)
    loss = lambda y, t: jnp.sum(y * t)  # zero loss on steps 3..6: exactly zero cotangents there

    def meta(clip_norm, oracle=False):
        make = jb.reference_value_and_grad if oracle else jb.value_and_grad
        f = make(CELL.step, loss, truncation=truncation, clip_norm=clip_norm)
        return jax.jit(jax.grad(lambda p: jnp.sum(f(p, carry, xs, targets)[1]["W_hh"] ** 2)))(params)

    # Not against each other: the oracle's stop_gradient also freezes the cut carries' dependence on
    # the parameters in the second derivative, which the derivative of the engine's gradient keeps.
    for oracle in (False, True):
        unclipped = meta(None, oracle)
        assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(unclipped))
        _close(meta(1e6, oracle), unclipped, rtol=1e-9)


@pytest.mark.parametrize("carry", [(), {}, None])
def test_step_without_carry(carry):
    step = lambda p, c, x: (c, jnp.tanh(x @ p))
    params, xs, targets = jnp.ones((3, 4)), jnp.ones((5, 2, 3)), jnp.zeros((5, 2, 4))
    assert jb.check_grads(step, mse, params, carry, xs, targets, argnums=(0, 2), truncation=2, clip_norm=1.0) < 1e-10


def test_step_returning_a_list():
    step = lambda p, c, x: [jnp.tanh(x @ p + c), c]
    params, carry, xs, targets = jnp.ones((3, 4)), jnp.zeros((2, 4)), jnp.ones((5, 2, 3)), jnp.zeros((5, 2, 4))
    assert jb.check_grads(step, mse, params, carry, xs, targets, argnums=(0, 1, 2)) < 1e-10


def test_empty_sequence_loss_follows_the_params_dtype():
    params, carry, xs, targets = _args(T=0)
    for make in (jb.value_and_grad, jb.reference_value_and_grad):
        (loss, _), _ = make(CELL.step, mse)(params, carry, xs, targets)
        assert loss.dtype == jnp.float64


def test_lengths_to_mask_rejects_a_negative_length():
    with pytest.raises(ValueError, match="length must be a non-negative int.*got length=-1"):
        jb.lengths_to_mask(jnp.array([1]), -1)


def test_bidirectional_rejects_a_probe():
    params, carry, xs, _ = _args()
    with pytest.raises(TypeError, match="bidirectional does not take probe"):
        jb.bidirectional(CELL.step, CELL.step, (params, params), (carry, carry), xs, probe=jb.diagnostics_probe(10))


@pytest.mark.parametrize("make", [jb.elman, jb.lstm, jb.gru])
def test_sixteen_bit_init(make):
    cell = make(4)
    for dtype in (jnp.bfloat16, jnp.float16):
        params = cell.init(jax.random.key(0), 3, dtype)
        assert {a.dtype for a in jax.tree.leaves(params)} == {jnp.dtype(dtype)}
    np.testing.assert_array_equal(cell.init(jax.random.key(0), 3, jnp.bfloat16)["W_hh" if make is jb.elman else "W_h"],
                                  cell.init(jax.random.key(0), 3)["W_hh" if make is jb.elman else "W_h"].astype(jnp.bfloat16))


@pytest.mark.parametrize("make", [jb.elman, jb.lstm, jb.gru])
def test_cells_differentiate_an_unbatched_input_against_a_batched_carry(make):
    cell = make(4)
    params = cell.init(jax.random.key(0), 3, jnp.float64)
    xs, targets = jax.random.normal(jax.random.key(1), (6, 3)), jnp.zeros((6, 2, 4))
    with jax.numpy_rank_promotion("allow"):  # the input broadcasts against the carry's batch axis
        assert jb.check_grads(cell.step, mse, params, cell.initial_carry((2,), jnp.float64), xs, targets,
                              argnums=(0, 1, 2)) < 1e-10


LSTM, GRU = jb.lstm(4), jb.gru(4)


@pytest.mark.parametrize("cell, params, carry, xs, error, match", [
    (CELL, "elman", jnp.zeros((2, 4)), jnp.ones((10, 2, 2)), ValueError, r"x must have input_size=3 .* got x of shape \(2, 2\)"),
    (CELL, "elman", jnp.zeros((3, 4)), jnp.ones((10, 2, 3)), ValueError, r"batch shape \(2,\) but the carry has batch shape \(3,\)"),
    (CELL, "elman", jnp.zeros((2, 4)), jnp.ones((2, 10, 3)), ValueError, r"batch-major, pass jnp.swapaxes\(xs, 0, 1\)"),
    (CELL, "elman", jnp.zeros((2, 5)), jnp.ones((10, 2, 3)), ValueError, r"hidden_size=4 .* got shape \(2, 5\)"),
    (CELL, "gru", jnp.zeros((2, 4)), jnp.ones((10, 2, 3)), TypeError, r"elman cell's params .* another cell"),
    (LSTM, "lstm", (jnp.zeros((2, 4)),) * 2, jnp.ones((10, 2, 3)), TypeError, r"carry of the lstm cell must be LSTMState .*; got tuple"),
    (GRU, "lstm", jnp.zeros((2, 4)), jnp.ones((10, 2, 3)), TypeError, r"gru cell's params"),
])
def test_cells_name_what_is_wrong(cell, params, carry, xs, error, match):
    params = {"elman": CELL, "gru": GRU, "lstm": LSTM}[params].init(jax.random.key(0), 3)
    targets = jnp.zeros(xs.shape[:2] + (4,))
    with pytest.raises(error, match=match):
        jb.value_and_grad(cell.step, mse)(params, carry, xs, targets)


def test_check_finite_runs_in_check_grads_and_refuses_jit():
    args = _args()
    assert jb.check_grads(CELL.step, mse, *args, truncation=3, check_finite=True) < 1e-10
    f = jb.value_and_grad(CELL.step, mse, check_finite=True)
    with pytest.raises(ValueError, match=r"check_finite=True.*cannot be traced.*outside jit"):
        jax.jit(f)(*args)
    import optax
    train_step = jb.make_train_step(CELL.step, mse, optax.sgd(0.1), check_finite=True)
    with pytest.raises(ValueError, match=r"check_finite=True.*cannot be traced"):
        jax.jit(train_step)(args[0], optax.sgd(0.1).init(args[0]), *args[1:])


def test_check_finite_with_a_binomial_schedule():
    args = _args()
    assert jb.check_grads(CELL.step, mse, *args, remat=jb.Binomial(2, block=1), check_finite=True) < 1e-10
    bad = (args[0], args[1], args[2].at[7, 0, 0].set(jnp.nan), args[3])
    with pytest.raises(Exception, match="non-finite carry or output in the forward pass at step 7"):
        jb.value_and_grad(CELL.step, mse, remat=jb.Binomial(2, block=1), check_finite=True)(*bad)
