"""Step combinators keep every gradient option exact."""

import chex
import jax
import jax.numpy as jnp
import pytest

import jaxbptt as jb
from steps import problem

ARGNUMS = (0, 1, 2)
OPTIONS = [dict(), dict(truncation=3, clip_norm=0.05), dict(truncation=(2, 5))]


@pytest.mark.parametrize("name", ["lstm", "two_layer"])
def test_masked_batch_equals_each_sequence_at_its_own_length(name):
    step, _, params, carry, xs, _ = problem(name, T=9, B=3)
    lengths = [9, 4, 1]
    mask = jb.lengths_to_mask(jnp.asarray(lengths), 9)
    assert mask.shape == (9, 3) and mask.dtype == jnp.bool_
    objective = lambda final, ys: sum(jnp.sum(jnp.sin(a)) for a in jax.tree.leaves((final, ys)))

    final, ys = jb.unroll(jb.masked(step), params, carry, (xs, mask))
    g = jax.grad(lambda p: objective(*jb.unroll(jb.masked(step), p, carry, (xs, mask))))(params)
    g_sum = jax.tree.map(jnp.zeros_like, params)
    for i, n in enumerate(lengths):
        row = lambda tree: jax.tree.map(lambda a: a[i:i + 1], tree)
        run = lambda p: jb.unroll(step, p, row(carry), xs[:n, i:i + 1])
        final_i, ys_i = run(params)
        chex.assert_trees_all_close(row(final), final_i, rtol=1e-12)
        chex.assert_trees_all_close(jax.tree.map(lambda a: a[:n, i:i + 1], ys), ys_i, rtol=1e-12)
        assert all(bool(jnp.all(a[n:, i] == 0)) for a in jax.tree.leaves(ys))
        # padded steps add sin(0) = 0 to the objective, so the sums of per-row objectives agree
        g_sum = jax.tree.map(jnp.add, g_sum, jax.grad(lambda p: objective(*run(p)))(params))
    chex.assert_trees_all_close(g, g_sum, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("options", OPTIONS)
def test_combinators_against_the_oracle(options):
    step, loss_fn, params, carry, xs, targets = problem("gru", T=13, B=3)
    mask = jb.lengths_to_mask(jnp.asarray([13, 7, 2]), 13)
    resets = jnp.zeros((13, 3), bool).at[5, 0].set(True).at[9, 2].set(True)
    cell2 = jb.with_readout(jb.lstm(5), 3)
    deep = jb.stacked(jb.gru(5).step, cell2.step)
    deep_params = (jb.gru(5).init(jax.random.key(1), 4, jnp.float64), cell2.init(jax.random.key(2), 5, jnp.float64))
    deep_carry = (jb.gru(5).initial_carry((3,), jnp.float64), cell2.initial_carry((3,), jnp.float64))
    cases = [
        (jb.masked(step), params, carry, (xs, mask)),
        (jb.resettable(step, jnp.zeros(5)), params, carry, (xs, resets)),
        (deep, deep_params, deep_carry, xs),
    ]
    for s, p, c, x in cases:
        assert jb.check_grads(s, loss_fn, p, c, x, targets, argnums=(0, 1), rtol=1e-10, **options) < 1e-10


def test_resets_equal_separate_episodes():
    step, loss_fn, params, carry, xs, targets = problem("elman", T=10, B=1)
    init = jax.tree.map(lambda a: a[0] * 0 + 0.3, carry)
    resets = jnp.zeros((10, 1), bool).at[6, 0].set(True)
    episodes_carry = jax.tree.map(lambda a: jnp.full_like(a, 0.3), carry)

    def joined(p):
        return jb.unroll(jb.resettable(step, init), p, episodes_carry, (xs, resets))

    def separate(p):
        f1, y1 = jb.unroll(step, p, episodes_carry, xs[:6])
        f2, y2 = jb.unroll(step, p, episodes_carry, xs[6:])
        return f2, jnp.concatenate([y1, y2])

    chex.assert_trees_all_close(joined(params), separate(params), rtol=1e-12)
    gj = jax.grad(lambda p: jnp.sum(jnp.sin(joined(p)[1])))(params)
    gs = jax.grad(lambda p: jnp.sum(jnp.sin(separate(p)[1])))(params)
    chex.assert_trees_all_close(gj, gs, rtol=1e-10, atol=1e-13)


def test_stacked_residual_and_manual_composition():
    a, b = jb.gru(4), jb.gru(4)
    pa, pb = a.init(jax.random.key(0), 4, jnp.float64), b.init(jax.random.key(1), 4, jnp.float64)
    ca, cb = a.initial_carry((2,), jnp.float64), b.initial_carry((2,), jnp.float64)
    x = jnp.ones((2, 4))
    (na, nb), y = jb.stacked(a.step, b.step, residual=True)((pa, pb), (ca, cb), x)
    ma, ya = a.step(pa, ca, x)
    mb, yb = b.step(pb, cb, ya)
    chex.assert_trees_all_close((na, nb, y), (ma, mb, yb + ya), rtol=1e-14)


def test_bad_input():
    step, loss_fn, params, carry, xs, targets = problem("elman", T=5, B=3)
    with pytest.raises(TypeError, match="mask must be a bool array of the batch shape; got dtype int"):
        jb.unroll(jb.masked(step), params, carry, (xs, jnp.ones((5, 3), int)))
    with pytest.raises(ValueError, match=r"mask must have the batch shape, .* got mask of shape \(2,\) but carry has shape \(3, 5\)"):
        jb.unroll(jb.masked(step), params, carry, (xs, jnp.ones((5, 2), bool)))
    with pytest.raises(ValueError, match=r"every leaf of xs must share the leading \(time\) axis length"):
        jb.unroll(jb.masked(step), params, carry, (xs, jnp.ones((4, 3), bool)))
    with pytest.raises(TypeError, match=r"masked\(step\) takes at each step the pair \(x, mask\).* pass xs = "
                                        r"\(xs, mask\) .*; got the step input float64\[3,4\]"):
        jb.unroll(jb.masked(step), params, carry, xs)
    with pytest.raises(TypeError, match="reset must be a bool array"):
        jb.unroll(jb.resettable(step, 0.0), params, carry, (xs, jnp.zeros((5, 3))))
    resets = jnp.zeros((5, 3), bool)
    with pytest.raises(TypeError, match=r"resettable\(step\) takes at each step the pair \(x, reset\)"):
        jb.unroll(jb.resettable(step, 0.0), params, carry, xs)
    with pytest.raises(TypeError, match=r"initial_carry must have the carry's pytree structure; initial_carry is "
                                        r"\(float64\[5\], 0.0\) but the carry is float64\[3,5\]"):
        jb.unroll(jb.resettable(step, (jnp.zeros(5), 0.0)), params, carry, (xs, resets))
    with pytest.raises(ValueError, match=r"initial_carry has shape \(4,\), which does not broadcast to the carry's "
                                         r"shape \(3, 5\)"):
        jb.unroll(jb.resettable(step, jnp.zeros(4)), params, carry, (xs, resets))
    with pytest.raises(ValueError, match=r"stacked with 2 layers needs params as a tuple of 2 entries, one per layer; got tuple of length 1"):
        jb.unroll(jb.stacked(step, step), (params,), (carry, carry), xs)
    with pytest.raises(ValueError, match=r"residual=True\): layer 1 output .* does not match its input"):
        g = jb.gru(6)
        jb.stacked(step, g.step, residual=True)((params, g.init(jax.random.key(0), 3, jnp.float64)),
                                               (carry, g.initial_carry((3,), jnp.float64)), xs[0])
    with pytest.raises(TypeError, match="lengths must be an integer array"):
        jb.lengths_to_mask(jnp.ones(3), 4)
