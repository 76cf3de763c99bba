"""The path choice: both forced engines give the oracle's gradients; the cost model and the block
plan only ever pick exact paths."""

import chex
import jax
import jax.numpy as jnp
import pytest

import jaxbptt as jb
from jaxbptt._core import methods as _path
from jaxbptt._core.options import resolve
from jaxbptt._engine.remat import make_plan
from steps import problem

ARGNUMS = (0, 1, 2)


@pytest.mark.parametrize("engine", ["reverse", "autodiff"])
@pytest.mark.parametrize("name, options", [("elman", {}), ("lstm", dict(truncation=4, clip_norm=0.05)), ("gru", {}),
                                           ("two_layer", dict(truncation=4, clip_norm=0.05))])
def test_forced_paths_match_oracle(engine, name, options):
    step, loss_fn, *args = problem(name, T=13)
    got = jax.jit(jb.value_and_grad(step, loss_fn, argnums=ARGNUMS, engine=engine, **options))(*args)
    ref = jax.jit(jb.reference_value_and_grad(step, loss_fn, argnums=ARGNUMS, **options))(*args)
    chex.assert_trees_all_close(got, ref, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("engine", ["reverse", "autodiff"])
def test_forced_paths_unroll_grad_and_vmap(engine):
    step, _, params, carry, xs, _ = problem("lstm", T=11)

    def loss(p, engine):
        final, ys = jb.unroll(step, p, carry, xs, truncation=3, reverse=True, engine=engine)
        return jnp.sum(ys**2) + jnp.sum(final.c)

    ref = jax.grad(lambda p: jnp.sum(jb.reference_unroll(step, p, carry, jax.tree.map(lambda a: a[::-1], xs),
                                                          truncation=3)[1] ** 2)
                   + jnp.sum(jb.reference_unroll(step, p, carry, xs[::-1], truncation=3)[0].c))(params)
    chex.assert_trees_all_close(jax.jit(jax.grad(loss), static_argnums=1)(params, engine), ref, rtol=1e-10)
    stacked = jax.tree.map(lambda a: jnp.stack([a, 0.5 * a]), params)
    batched = jax.vmap(jax.grad(loss), in_axes=(0, None))(stacked, engine)
    half = jax.grad(loss)(jax.tree.map(lambda a: a[1], stacked), "reverse")
    chex.assert_trees_all_close(jax.tree.map(lambda a: a[1], batched), half, rtol=1e-10)


def test_autodiff_path_check_grads():
    step, _, params, carry, xs, _ = problem("gru", T=6, B=2, H=3)
    loss = lambda p: jnp.sum(jb.unroll(step, p, carry, xs, engine="autodiff")[1] ** 2)
    jax.test_util.check_grads(loss, (params,), order=1, modes=["rev"])


def test_engine_errors():
    step, loss_fn, *_ = problem("elman", T=3)
    with pytest.raises(ValueError, match=r"engine must be one of \['auto', 'reverse', 'autodiff'\]; got engine='fast'"):
        jb.value_and_grad(step, loss_fn, engine="fast")
    with pytest.raises(ValueError, match=r"engine='autodiff' .* got remat, diagnostics set"):
        jb.value_and_grad(step, loss_fn, engine="autodiff", remat=4, diagnostics=True)
    with pytest.raises(ValueError, match=r"engine='autodiff' .* got probe set"):
        jb.unroll(step, *problem("elman", T=3)[2:5], engine="autodiff", probe=jb.diagnostics_probe(3))


@pytest.mark.parametrize("length, rows, elements, expected", [
    (25, 64, 2 * 64 * 128, True),  # short sequence at a large batch: any width
    (100, 64, 2 * 64 * 32, True),  # narrow carry at a large batch: any length
    (1000, 32, 32 * 64, True),
    (100, 64, 64 * 128, False),  # wide enough for the engine's per-block products to pay
    (1000, 64, 2 * 64 * 128, False),
    (25, 16, 16 * 32, False),  # small batches: the engine at every length and width
    (100, 8, 8 * 32, False),
])
def test_cost_model_sends_short_or_narrow_large_batches_to_autodiff(length, rows, elements, expected):
    assert _path.prefers_autodiff(length, rows, elements) is expected


def test_auto_keeps_the_engine_where_an_option_needs_it():
    cell = jb.lstm(8).step
    opts = lambda engine="auto", **option: resolve(25, engine=engine, **option)
    assert _path.prefers_autodiff(25, 64, 2 * 64 * 8)  # a size the cost model gives to autodiff
    assert _path.use_autodiff(cell, 25, 64, 2 * 64 * 8, opts())
    assert _path.use_autodiff(cell, 25, 64, 2 * 64 * 8, opts(truncation=5))
    for option in (dict(remat=5), dict(clip_norm=1.0), dict(truncation=(2, 4)), dict(diagnostics=True),  # or a probe
                   dict(check_finite=True), dict(axis_name="batch")):
        assert not _path.use_autodiff(cell, 25, 64, 2 * 64 * 8, opts(**option))
    assert not _path.use_autodiff(lambda p, c, x: (c, c), 25, 64, 2 * 64 * 8, opts())  # measured on built-ins only
    assert not _path.use_autodiff(cell, 25, 64, 2 * 64 * 8, opts("reverse"))
    assert _path.use_autodiff(cell, 10_000, 1, 8, opts("autodiff"))


@pytest.mark.parametrize("length", [25, 100, 1000])
@pytest.mark.parametrize("rows, elements", [(1, 64), (8, 1024), (64, 2048), (64, 16384), (16, 8192)])
def test_block_plan_covers_time_with_short_enough_blocks(length, rows, elements):
    plan = make_plan(length, None, rows, elements)
    assert sum(block * count for _, block, count in plan.groups) == length
    assert all(block <= -(-length // 8) for _, block, _ in plan.groups)  # at least 8 blocks' worth
    assert plan.groups[0][1] >= make_plan(length, None, rows).groups[0][1] // 2  # never much shorter than by rows alone
