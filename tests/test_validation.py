"""Bad input fails at trace time with a message naming the argument, what it got and what it expected."""

import jax
import jax.numpy as jnp
import pytest

import jaxbptt as jb
from steps import mse, problem


@pytest.fixture
def elman_problem():
    return problem("elman", T=6)


def test_targets_time_axis_mismatch(elman_problem):
    step, loss_fn, params, carry, xs, targets = elman_problem
    with pytest.raises(ValueError, match=r"targets must have the same leading \(time\) axis length as xs: xs has 6 steps but targets has 5"):
        jb.value_and_grad(step, loss_fn)(params, carry, xs, targets[:5])


def test_xs_leaves_disagree_on_time():
    step = lambda p, h, x: (h, x["a"])
    with pytest.raises(ValueError, match=r"every leaf of xs must share the leading \(time\) axis length; got xs\['a'\]: 4, xs\['b'\]: 3"):
        jb.unroll(step, None, jnp.zeros(2), {"a": jnp.ones((4, 2)), "b": jnp.ones((3, 2))})


def test_scalar_leaf_in_xs():
    with pytest.raises(ValueError, match=r"xs must have time as the leading axis of every leaf, but xs\[1\] is a scalar"):
        jb.unroll(lambda p, h, x: (h, h), None, jnp.zeros(2), (jnp.ones((4, 2)), jnp.asarray(1.0)))


def test_carry_dtype_change_names_component():
    def step(p, c, x):
        return {"h": c["h"].astype(jnp.float32), "n": c["n"]}, x

    carry = {"h": jnp.zeros(3, jnp.float64), "n": jnp.zeros(3)}
    with pytest.raises(TypeError, match=r"the input carry component carry\['h'\] has type float64\[3\] but the corresponding output carry component has type float32\[3\]"):
        jb.unroll(step, None, carry, jnp.ones((4, 3)))


def test_carry_shape_change():
    with pytest.raises(TypeError, match=r"carry\[0\] has type float64\[3\] but the corresponding output carry component has type float64\[4\]"):
        jb.unroll(lambda p, c, x: ((jnp.concatenate([c[0], x[:1]]),), x), None, (jnp.zeros(3),), jnp.ones((4, 3)))


def test_carry_structure_change():
    with pytest.raises(TypeError, match="same pytree structure as the input carry"):
        jb.unroll(lambda p, c, x: ((c, c), x), None, jnp.zeros(3), jnp.ones((4, 3)))


def test_step_not_returning_pair():
    with pytest.raises(TypeError, match=r"step must return a pair \(carry, y\)"):
        jb.unroll(lambda p, c, x: c, None, jnp.zeros(3), jnp.ones((4, 3)))


def test_weakly_typed_initial_carry_is_accepted():
    final, ys = jb.unroll(lambda p, c, x: (c + x.sum(), c), None, 0.0, jnp.ones((4, 3)))
    assert float(final) == 12.0 and ys.dtype == jnp.float64


@pytest.mark.parametrize("fn", [jb.unroll, lambda step, *a: jb.value_and_grad(step, mse)])
def test_non_callable_step(fn):
    with pytest.raises(TypeError, match=r"step must be callable as step\(\.\.\.\); got 3 of type int"):
        fn(3, None, jnp.zeros(2), jnp.ones((2, 2)))


def test_non_callable_loss():
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        jb.value_and_grad(jb.elman(2).step, "mse")


def test_non_scalar_loss(elman_problem):
    step, _, *args = elman_problem
    with pytest.raises(ValueError, match=r"loss_fn\(y_t, target_t\) must return a float scalar"):
        jb.value_and_grad(step, lambda y, t: (y - t) ** 2)(*args)


@pytest.mark.parametrize("argnums", [3, (0, 0), (), "params", True, -1])
def test_bad_argnums(argnums):
    with pytest.raises(ValueError, match="argnums must be an int or a tuple of distinct ints among 0"):
        jb.value_and_grad(jb.elman(2).step, mse, argnums=argnums)


def test_integer_xs_not_differentiable():
    step = lambda p, h, x: (h + p[x], h)
    with pytest.raises(TypeError, match=r"cannot differentiate with respect to xs: xs has dtype int"):
        jb.value_and_grad(step, lambda y, t: jnp.sum(y), argnums=2)(jnp.ones(3), jnp.zeros(()), jnp.zeros(4, int), jnp.ones(4))


@pytest.mark.parametrize(
    "truncation, error, message",
    [
        (0, ValueError, r"truncation must be an int k >= 1 \(the chunk length\); got truncation=0"),
        (-2, ValueError, r"truncation must be an int k >= 1"),
        (jnp.asarray(0), ValueError, r"truncation must be an int k >= 1"),
        (2.5, TypeError, r"truncation must be None, an int k >= 1 or a pair \(k1, k2\); got 2.5"),
        (True, TypeError, r"truncation must be None, an int k >= 1 or a pair"),
        (jnp.asarray(2.0), TypeError, r"truncation as an array must be an integer scalar"),
        ((3, 2), ValueError, r"truncation=\(k1, k2\) needs 1 <= k1 <= k2"),
        ((0, 4), ValueError, r"truncation=\(k1, k2\) needs 1 <= k1 <= k2"),
        ((1, 2, 3), TypeError, r"truncation=\(k1, k2\) must be a pair of Python ints"),
        ((2.0, 3), TypeError, r"truncation=\(k1, k2\) must be a pair of Python ints"),
    ],
)
def test_bad_truncation(truncation, error, message):
    with pytest.raises(error, match=message):
        jb.value_and_grad(jb.elman(2).step, mse, truncation=truncation)
    with pytest.raises(error, match=message):
        jb.unroll(jb.elman(2).step, jb.elman(2).init(jax.random.key(0), 2), jnp.zeros(2), jnp.ones((3, 2)),
                  truncation=truncation)


@pytest.mark.parametrize(
    "clip_norm, error, message",
    [
        (0.0, ValueError, r"clip_norm must be a finite float > 0 .*; got clip_norm=0.0"),
        (-1.0, ValueError, r"clip_norm must be a finite float > 0"),
        (float("nan"), ValueError, r"clip_norm must be a finite float > 0 .*; got clip_norm=nan"),
        (float("inf"), ValueError, r"clip_norm must be a finite float > 0"),
        ("1", TypeError, r"clip_norm must be None or a float > 0; got '1'"),
    ],
)
def test_bad_clip_norm(clip_norm, error, message):
    with pytest.raises(error, match=message):
        jb.value_and_grad(jb.elman(2).step, mse, clip_norm=clip_norm)


@pytest.mark.parametrize(
    "remat, error, message",
    [
        (0, ValueError, r"remat must be a positive int or jaxbptt.Every\(steps\) .*; got remat=0"),
        (jb.Every(-1), ValueError, r"remat must be a positive int .*; got remat=Every\(steps=-1\)"),
        ("cubic", TypeError, r"remat must be None, a positive int .*, 'sqrt' .*, jaxbptt.Binomial\(slots\) or jaxbptt.Invert\(\); got 'cubic'"),
        (1.5, TypeError, r"remat must be None, a positive int"),
    ],
)
def test_bad_remat(remat, error, message):
    with pytest.raises(error, match=message):
        jb.value_and_grad(jb.elman(2).step, mse, remat=remat)


def test_bad_unroll():
    for unroll in (-1, 2.5):
        with pytest.raises(ValueError, match=rf"unroll must be a positive int .*; got unroll={unroll}"):
            jb.value_and_grad(jb.elman(2).step, mse, unroll=unroll)


def test_batch_major_data_without_time_axis_suggests_it():
    cell = jb.with_readout(jb.elman(4), 1)
    params = cell.init(jax.random.key(0), 3)
    f = jb.value_and_grad(cell.step, mse)
    with pytest.raises(ValueError, match=r"xs looks batch-major, shaped \(batch=5, T, ...\): pass time_axis=1"):
        f(params, cell.initial_carry((5,)), jnp.ones((5, 9, 3)), jnp.ones((5, 9, 1)))


@pytest.mark.parametrize("kwargs, message", [
    (dict(hidden_size=0), "hidden_size must be a positive int; got 0"),
    (dict(hidden_size=4, activation="sigmoid"), r"activation must be one of \['relu', 'tanh'\]; got 'sigmoid'"),
    (dict(hidden_size=4, recurrent_init="zeros"), r"recurrent_init must be one of"),
])
def test_bad_cell_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        jb.elman(**kwargs)


def test_traced_bad_options_give_nan_not_silence(elman_problem):
    step, loss_fn, *args = elman_problem
    f = jax.jit(lambda k, c, *a: jb.value_and_grad(step, loss_fn, truncation=k, clip_norm=c)(*a)[1])
    ok = f(jnp.asarray(2), jnp.asarray(1.0), *args)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(ok))
    for k, c in [(0, 1.0), (2, float("nan")), (2, -1.0)]:
        bad = f(jnp.asarray(k), jnp.asarray(c), *args)
        assert all(bool(jnp.all(jnp.isnan(g))) for g in jax.tree.leaves(bad))
