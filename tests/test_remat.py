"""Memory policies give the same gradients as storing everything (up to rounding)."""

import chex
import jax
import jax.numpy as jnp
import pytest

import jaxbptt as jb
from jaxbptt._remat import binomial_cost, binomial_schedule
from steps import problem

ARGNUMS = (0, 1, 2)
S = 5


@pytest.mark.parametrize("T", [1, S - 1, S, S + 1, 23])
@pytest.mark.parametrize("name", ["lstm", "two_layer"])
def test_every_s_steps(name, T):
    step, loss_fn, *args = problem(name, T=T)
    ref = jax.jit(jb.value_and_grad(step, loss_fn, argnums=ARGNUMS))(*args)
    got = jax.jit(jb.value_and_grad(step, loss_fn, argnums=ARGNUMS, remat=S))(*args)
    chex.assert_trees_all_close(got, ref, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("options", [dict(truncation=4, clip_norm=0.05), dict(truncation=(3, 8), clip_norm=0.2)])
@pytest.mark.parametrize("remat", [3, "sqrt"])
def test_composes_with_truncation_clipping_diagnostics(options, remat):
    step, loss_fn, *args = problem("gru", T=29)
    got = jax.jit(jb.value_and_grad(step, loss_fn, argnums=ARGNUMS, remat=remat, diagnostics=True, **options))(*args)
    ref = jax.jit(jb.value_and_grad(step, loss_fn, argnums=ARGNUMS, diagnostics=True, **options))(*args)
    chex.assert_trees_all_close(got, ref, rtol=1e-12, atol=1e-14)
    oracle = jb.reference_value_and_grad(step, loss_fn, argnums=ARGNUMS, **options)(*args)[1]
    chex.assert_trees_all_close(got[1], oracle, rtol=1e-10, atol=1e-13)


def test_remat_unroll_under_grad():
    step, _, params, carry, xs, _ = problem("dict_input", T=17)
    f = lambda **o: jax.grad(lambda p: jax.numpy.sum(jb.unroll(step, p, carry, xs, **o)[1] ** 2))(params)
    chex.assert_trees_all_close(f(remat=4), f(), rtol=1e-12)


@pytest.mark.parametrize("T", [1, 2, 3, 4, 23])
@pytest.mark.parametrize("remat", [jb.Binomial(3), jb.Binomial(3, block=1), jb.Binomial(1, block=2)])
def test_binomial_every_length(T, remat):
    step, loss_fn, *args = problem("gru", T=T)
    ref = jax.jit(jb.value_and_grad(step, loss_fn, argnums=ARGNUMS))(*args)
    got = jax.jit(jb.value_and_grad(step, loss_fn, argnums=ARGNUMS, remat=remat))(*args)
    chex.assert_trees_all_close(got, ref, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["lstm", "two_layer"])
def test_binomial_with_every_option(name):
    step, loss_fn, *args = problem(name, T=19)
    for options in [dict(truncation=(2, 5), clip_norm=0.1), dict(truncation=4)]:
        got = jax.jit(jb.value_and_grad(step, loss_fn, argnums=ARGNUMS, remat=jb.Binomial(2, block=2),
                                        diagnostics=True, **options))(*args)
        ref = jax.jit(jb.value_and_grad(step, loss_fn, argnums=ARGNUMS, diagnostics=True, **options))(*args)
        chex.assert_trees_all_close(got, ref, rtol=1e-12, atol=1e-14)
    f = lambda **o: jax.grad(lambda p: jax.numpy.sum(jnp.sin(jb.unroll(step, p, args[1], args[2], **o)[1])))(args[0])
    chex.assert_trees_all_close(f(remat=jb.Binomial(3, block=1)), f(), rtol=1e-12)


def test_binomial_schedule_is_optimal():
    from functools import lru_cache

    @lru_cache(None)
    def optimum(n, s):  # fewest units re-run: advance k, store, reverse [k, n) with s - 1, then [0, k) with s
        if n <= 1:
            return 0
        if s == 1:
            return n * (n - 1) // 2
        return min(k + optimum(n - k, s - 1) + optimum(k, s) for k in range(1, n))

    for s in range(1, 6):
        for n in range(1, 60):
            assert binomial_schedule(n, s).advances == optimum(n, s) == binomial_cost(n, s), (n, s)
    for n, s in [(1000, 10), (4096, 12), (100_000, 20)]:
        assert binomial_schedule(n, s).advances == binomial_cost(n, s)
    # Gruslys et al.'s regime: a few slots reverse thousands of steps with few extra passes
    assert binomial_cost(1000, 50) / 1000 < 2


def test_binomial_keeps_at_most_its_slots():
    """The snapshot buffer has `slots` carries; memory grows far slower than storing everything."""
    step, loss_fn, params, carry, xs, targets = problem("elman", T=512, B=4, H=32)
    temp = lambda remat: jax.jit(jb.value_and_grad(step, loss_fn, remat=remat)).lower(
        params, carry, xs, targets).compile().memory_analysis().temp_size_in_bytes
    assert temp(jb.Binomial(4, block=1)) < temp(None) / 10


@pytest.mark.parametrize("remat, message", [
    (jb.Binomial(0), r"remat=Binomial\(slots\) needs an int slots >= 1 \(carries kept\); got slots=0"),
    (jb.Binomial(2, block=0), r"needs block None or an int >= 1; got block=0"),
])
def test_bad_binomial(remat, message):
    with pytest.raises(ValueError, match=message):
        jb.value_and_grad(jb.elman(2).step, lambda y, t: jnp.sum(y), remat=remat)


def test_policy_values_equal_their_spellings():
    from jaxbptt._remat import make_plan

    assert make_plan(100, jb.Every(7), 4) == make_plan(100, 7, 4)
    assert make_plan(100, jb.Sqrt(), 4) == make_plan(100, "sqrt", 4)
    with pytest.raises(ValueError, match="remat must be a positive int"):
        make_plan(100, jb.Every(0), 4)
