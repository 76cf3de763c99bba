"""Memory policies give the same gradients as storing everything (up to rounding)."""

import chex
import jax
import pytest

import jaxbptt as jb
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
