"""Memory policies give the same gradients as storing everything (up to rounding)."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbptt as jb
from jaxbptt._engine.remat import (_beta_lookup, _binomials, _search_repetitions, _split, binomial_cost, binomial_schedule,
                            binomial_split)
from steps import problem

ARGNUMS = (0, 1, 2)
S = 5


@pytest.mark.parametrize("name, T", [("lstm", 1), ("two_layer", S - 1), ("lstm", S), ("two_layer", S + 1),
                                     ("lstm", 23)])
def test_every_s_steps(name, T):
    step, loss_fn, *args = problem(name, T=T)
    ref = jax.jit(jb.value_and_grad(step, loss_fn, argnums=ARGNUMS))(*args)
    got = jax.jit(jb.value_and_grad(step, loss_fn, argnums=ARGNUMS, remat=S))(*args)
    chex.assert_trees_all_close(got, ref, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("remat, options", [(3, dict(truncation=4, clip_norm=0.05)),
                                            ("sqrt", dict(truncation=(3, 8), clip_norm=0.2))])
def test_composes_with_truncation_clipping_diagnostics(remat, options):
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


@functools.lru_cache(None)
def optimum(n, s):
    """Fewest units re-run, by dynamic programming: advance k, store, reverse [k, n) with s - 1
    snapshots, then [0, k) with s."""
    if n <= 1:
        return 0
    if s == 1:
        return n * (n - 1) // 2
    return min(k + optimum(n - k, s - 1) + optimum(k, s) for k in range(1, n))


def test_binomial_split_is_optimal():
    for s in range(1, 7):
        for n in range(1, 80):
            assert binomial_cost(n, s) == optimum(n, s), (n, s)
            if s > 1 and n > 1:
                k = binomial_split(n, s)
                assert 1 <= k < n and k + optimum(k, s) + optimum(n - k, s - 1) == optimum(n, s), (n, s, k)
    # As the loop computes it (a capped table and a bisection, vectorised here) at 10^6 units
    units = 10**6
    table = _binomials(units)
    beta = functools.partial(_beta_lookup, table, units + 1, np)
    n = np.unique(np.concatenate([np.geomspace(2, units, 200).astype(np.int32), [units - 1, units]]))
    for s in (2, 3, 8, 64):
        k = _split(n, s, _search_repetitions(beta, table.shape[1], n, s, np), beta, np.where)
        assert k.tolist() == [binomial_split(int(m), s) for m in n]
        assert all(j + binomial_cost(j, s) + binomial_cost(m - j, s - 1) == binomial_cost(m, s)
                   for j, m in zip(k.tolist(), n.tolist()))
    # Gruslys et al.'s regime: a few slots reverse thousands of steps with few extra passes
    assert binomial_cost(1000, 50) / 1000 < 2


@pytest.mark.parametrize("units, slots", [(1, 1), (2, 3), (13, 1), (13, 2), (29, 3), (30, 5), (40, 40)])
def test_binomial_loop_reverses_each_unit_once(units, slots):
    """The loop's moves, simulated on the host with a carry that is its own position: each unit is
    reversed once, last first, from its own carry, with the optimal number of units re-run and at
    most `slots` snapshots."""
    schedule = binomial_schedule(units, slots)
    cursor, snaps, carry, reversed_, advances = schedule.start(np), {0: 0}, 0, [], 0
    for _ in range(schedule.steps):
        move, cursor = schedule.move(cursor, np)
        carry = snaps[int(move.source)] if move.restore else carry
        assert carry == move.unit
        if move.reverse:
            reversed_.append(carry)
        else:
            carry, advances = carry + 1, advances + 1
        if move.store:
            assert 0 < move.destination < slots
            snaps[int(move.destination)] = carry
    assert reversed_ == list(range(units - 1, -1, -1)) and cursor.top == -1
    assert advances == schedule.advances == optimum(units, min(slots, units))


@pytest.mark.parametrize("name, T, remat, options, dtype", [
    ("two_layer", 17, jb.Binomial(3, block=3), dict(truncation=(2, 5), clip_norm=0.1), jnp.float64),  # a tail unit
    ("lstm", 3, jb.Binomial(5), dict(truncation=2), jnp.float32),  # T < slots
])
def test_binomial_gradients(name, T, remat, options, dtype):
    """Against jax.grad of the lax.scan surrogate."""
    step, loss_fn, *args = problem(name, T=T, B=2, D=2, H=3, dtype=dtype)
    f = jb.value_and_grad(step, loss_fn, argnums=ARGNUMS, remat=remat, **options)
    got = jax.jit(f)(*args)
    ref = jb.reference_value_and_grad(step, loss_fn, argnums=ARGNUMS, **options)(*args)
    tol = dict(rtol=1e-10, atol=1e-13) if dtype == jnp.float64 else dict(rtol=1e-4, atol=1e-6)
    chex.assert_trees_all_close(got, ref, **tol)


@pytest.mark.parametrize("options", [{}, dict(truncation=(2, 5), clip_norm=0.3)])
def test_binomial_second_derivatives(options):
    """Reverse over reverse: Hessian-vector products of the exact gradient (through jb.unroll's
    custom VJP, as jax.hessian goes) equal the surrogate's; under truncation and clipping, those
    through value_and_grad equal the ones with every step stored (the gradient the options define)."""
    step, loss_fn, params, carry, xs, targets = problem("elman", T=7, B=2, D=2, H=3)
    direction = jax.tree.map(lambda p: jnp.cos(jnp.arange(p.size, dtype=p.dtype)).reshape(p.shape), params)

    def hvp(grad_fn):
        inner = lambda p: sum(jnp.vdot(g, d) for g, d in zip(jax.tree.leaves(grad_fn(p)), jax.tree.leaves(direction)))
        return jax.jit(jax.grad(inner))(params)

    if options:
        engine = lambda remat: lambda p: jb.value_and_grad(step, loss_fn, remat=remat, **options)(
            p, carry, xs, targets)[1]
        chex.assert_trees_all_close(hvp(engine(jb.Binomial(2, block=1))), hvp(engine(None)), rtol=1e-10, atol=1e-13)
    else:
        total = lambda p: jnp.sum(jax.vmap(loss_fn)(jb.unroll(step, p, carry, xs, remat=jb.Binomial(2, block=2))[1],
                                                    targets))
        oracle = lambda p: jb.reference_value_and_grad(step, loss_fn)(p, carry, xs, targets)[1]
        chex.assert_trees_all_close(hvp(jax.grad(total)), hvp(oracle), rtol=1e-10, atol=1e-13)


def test_binomial_under_vmap_of_a_traced_truncation():
    step, loss_fn, *args = problem("gru", T=7, B=2, D=2, H=3)
    run = lambda remat: jax.jit(jax.vmap(lambda k: jb.value_and_grad(
        step, loss_fn, argnums=ARGNUMS, remat=remat, truncation=k, clip_norm=0.1, diagnostics=True)(*args)))
    ks = jnp.array([2, 3, 100])
    chex.assert_trees_all_close(run(jb.Binomial(2, block=2))(ks), run(None)(ks), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("remat, message", [
    (jb.Binomial(0), r"remat=Binomial\(slots\) needs an int slots >= 1 \(carries kept\); got slots=0"),
    (jb.Binomial(2, block=0), r"needs block None or an int >= 1; got block=0"),
])
def test_bad_binomial(remat, message):
    with pytest.raises(ValueError, match=message):
        jb.value_and_grad(jb.elman(2).step, lambda y, t: jnp.sum(y), remat=remat)


def test_binomial_schedule_longer_than_a_loop_can_count():
    from jaxbptt._engine.remat import make_plan

    with pytest.raises(ValueError, match=r"remat=Binomial\(slots=1, block=1\) on 1000000 steps would run "
                                         r"500000500000 blocks of 1 steps .* more slots or a larger block"):
        make_plan(10**6, jb.Binomial(1, block=1), 4)


def test_policy_values_equal_their_spellings():
    from jaxbptt._engine.remat import make_plan

    assert make_plan(100, jb.Every(7), 4) == make_plan(100, 7, 4)
    assert make_plan(100, jb.Sqrt(), 4) == make_plan(100, "sqrt", 4)
    with pytest.raises(ValueError, match=r"remat must be a positive int or jaxbptt.Every\(steps\)"):
        make_plan(100, jb.Every(0), 4)
