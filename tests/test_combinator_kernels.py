"""Combinators of kernel-backed steps stay kernel-backed and exact with every gradient option."""

import chex
import jax
import jax.numpy as jnp
import pytest

import jaxbptt as jb
from steps import mse, problem

OPTIONS = {"exact": dict(), "chunked-clipped-remat": dict(truncation=3, clip_norm=0.05, remat=4),
           "williams-peng": dict(truncation=(2, 5))}


def _stack(cells, residual, B, D, T):
    step = jb.stacked(*(c.step for c in cells), residual=residual)
    params, x = [], jnp.ones((D,), jnp.float64)
    for i, cell in enumerate(cells):
        p = cell.init(jax.random.key(i), x.shape[-1], jnp.float64)
        params.append(jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(9 + i), a.shape, a.dtype), p))
        _, x = cell.step(params[-1], cell.initial_carry((), jnp.float64), x)
    carry = tuple(jax.tree.map(lambda a: a + 0.1, c.initial_carry((B,), jnp.float64)) for c in cells)
    xs = jax.random.normal(jax.random.key(5), (T, B, D))
    return step, tuple(params), carry, xs, jax.random.normal(jax.random.key(7), (T, B, x.shape[-1]))


def _cases(name):
    """(step, params, carry, xs, targets, argnums) of one combinator at T=11, B=3."""
    if name == "stacked":
        return _stack((jb.gru(5), jb.with_readout(jb.lstm(5), 3)), False, 3, 4, 11) + ((0, 1, 2),)
    if name == "stacked-residual":
        return _stack((jb.lstm(4), jb.elman(4), jb.gru(4)), True, 3, 4, 11) + ((0, 1, 2),)
    step, _, params, carry, xs, targets = problem({"masked": "lstm", "resettable": "gru"}[name], T=11, B=3)
    if name == "masked":
        return jb.masked(step), params, carry, (xs, jb.lengths_to_mask(jnp.asarray([11, 6, 0]), 11)), targets, (0, 1)
    resets = jnp.zeros((11, 3), bool).at[0, 1].set(True).at[5, 0].set(True).at[8, 2].set(True)
    return jb.resettable(step, jnp.full((5,), 0.3)), params, carry, (xs, resets), targets, (0, 1)


# one option set per combinator keeps the suite fast; together they cover every option
CASES = {"masked": "chunked-clipped-remat", "resettable": "williams-peng", "stacked": "exact",
         "stacked-residual": "chunked-clipped-remat"}


@pytest.mark.parametrize("name, options", [(n, OPTIONS[o]) for n, o in CASES.items()], ids=CASES.keys())
def test_combinator_kernels_against_the_oracle(name, options):
    step, params, carry, xs, targets, argnums = _cases(name)
    assert isinstance(step, jb.Step)
    assert jb.check_grads(step, mse, params, carry, xs, targets, argnums=argnums, rtol=1e-10, **options) < 1e-10


@pytest.mark.parametrize("name", ["masked", "stacked-residual"])
def test_combinator_kernels_match_the_generic_path(name):
    """Diagnostics and unroll gradients of the kernel equal those of the same step taking the
    generic path (a plain function hides the kernel)."""
    step, params, carry, xs, targets, _ = _cases(name)
    plain = lambda p, c, x: step(p, c, x)
    run = lambda s: jax.jit(jb.value_and_grad(s, mse, clip_norm=0.1, truncation=4, diagnostics=True))(
        params, carry, xs, targets)
    chex.assert_trees_all_close(run(step), run(plain), rtol=1e-10)
    objective = lambda s: lambda p: sum(jnp.sum(jnp.sin(a)) for a in jax.tree.leaves(jb.unroll(s, p, carry, xs)))
    chex.assert_trees_all_close(jax.grad(objective(step))(params), jax.grad(objective(plain))(params), rtol=1e-10)


def test_stacked_of_a_plain_step_takes_the_generic_path():
    cell = jb.gru(3)
    assert not isinstance(jb.stacked(cell.step, lambda p, c, x: cell.step(p, c, x)), jb.Step)
    assert not isinstance(jb.masked(lambda p, c, x: cell.step(p, c, x)), jb.Step)
