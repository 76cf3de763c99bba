"""Truncated BPTT against jax.grad of the explicit stop_gradient surrogates (never finite differences)."""

import chex
import jax
import jax.numpy as jnp
import pytest
from jax import lax

import jaxbptt as jb
from steps import problem

ARGNUMS = (0, 1, 2)


# ---- independent surrogates: Python loops, short T -----------------------------------------------------


def chunked_loop_loss(step, loss_fn, k):
    def loss(params, carry, xs, targets):
        total = 0.0
        for t in range(jax.tree.leaves(xs)[0].shape[0]):
            if t > 0 and t % k == 0:
                carry = jax.tree.map(lax.stop_gradient, carry)
            carry, y = step(params, carry, jax.tree.map(lambda a: a[t], xs))
            total = total + loss_fn(y, jax.tree.map(lambda a: a[t], targets))
        return total

    return loss


def williams_peng_loop_loss(step, loss_fn, k1, k2):
    """Sum over chunks of the chunk's losses, re-running its window from a stopped carry."""

    def loss(params, carry, xs, targets):
        T = jax.tree.leaves(xs)[0].shape[0]
        at = lambda tree, t: jax.tree.map(lambda a: a[t], tree)
        carries = [carry]
        for t in range(T):
            carries.append(step(params, carries[-1], at(xs, t))[0])
        total = 0.0
        for j in range(-(-T // k1)):
            start, end = max(0, (j + 1) * k1 - k2), min((j + 1) * k1, T)
            c = carry if start == 0 else jax.tree.map(lax.stop_gradient, carries[start])
            for t in range(start, end):
                c, y = step(params, c, at(xs, t))
                if t >= j * k1:
                    total = total + loss_fn(y, at(targets, t))
        return total

    return loss


def _engine(step, loss_fn, truncation, *args, **options):
    return jax.jit(jb.value_and_grad(step, loss_fn, argnums=ARGNUMS, truncation=truncation, **options))(*args)


# T = 12: k = 1, a divisor, a non-divisor, T, > T; each cell meets several of them
@pytest.mark.parametrize("name, k", [("lstm", 1), ("two_layer", 4), ("tuple", 5), ("lstm", 5), ("two_layer", 12),
                                     ("tuple", 20)])
def test_chunked_matches_loop_surrogate(name, k):
    step, loss_fn, *args = problem(name, T=12)
    (_, _), g = _engine(step, loss_fn, k, *args)
    ref = jax.grad(chunked_loop_loss(step, loss_fn, k), argnums=ARGNUMS)(*args)
    chex.assert_trees_all_close(g, ref, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("name, k1, k2", [("gru", 3, 7), ("elman", 4, 4), ("dict_input", 1, 5), ("gru", 5, 19),
                                          ("elman", 2, 3), ("dict_input", 3, 7)])
def test_williams_peng_matches_loop_surrogate(name, k1, k2):
    step, loss_fn, *args = problem(name, T=14)
    (_, _), g = _engine(step, loss_fn, (k1, k2), *args)
    ref = jax.grad(williams_peng_loop_loss(step, loss_fn, k1, k2), argnums=ARGNUMS)(*args)
    chex.assert_trees_all_close(g, ref, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("name, truncation", [("lstm", 7), ("two_layer", 10), ("lstm", (3, 7)), ("two_layer", (1, 5)),
                                              ("lstm", (6, 20)), ("two_layer", 7)])
def test_long_sequence_against_oracle(name, truncation):
    step, loss_fn, *args = problem(name, T=203, B=2)
    (_, _), g = _engine(step, loss_fn, truncation, *args)
    (_, _), ref = jax.jit(jb.reference_value_and_grad(step, loss_fn, argnums=ARGNUMS, truncation=truncation))(*args)
    chex.assert_trees_all_close(g, ref, rtol=1e-10, atol=1e-13)


def test_oracle_matches_loop_surrogates():
    step, loss_fn, *args = problem("gru", T=11)
    for truncation, loop in [(3, chunked_loop_loss(step, loss_fn, 3)), ((2, 5), williams_peng_loop_loss(step, loss_fn, 2, 5))]:
        (_, _), ref = jb.reference_value_and_grad(step, loss_fn, argnums=ARGNUMS, truncation=truncation)(*args)
        chex.assert_trees_all_close(ref, jax.grad(loop, argnums=ARGNUMS)(*args), rtol=1e-10, atol=1e-13)


def test_equivalences():
    step, loss_fn, *args = problem("elman", T=12)
    g = lambda tr: _engine(step, loss_fn, tr, *args)[1]
    chex.assert_trees_all_close(g(4), g((4, 4)), rtol=1e-12)
    chex.assert_trees_all_close(g((3, 12 + 3)), g(None), rtol=1e-12)  # k2 >= T + k1 is exact BPTT
    chex.assert_trees_all_close(g(12), g(None), rtol=1e-12)
    exact, short = g(None), g(2)
    assert not jnp.allclose(exact[0]["cell"]["W_hh"], short[0]["cell"]["W_hh"])  # truncation does bite


def test_traced_k_under_vmap():
    step, loss_fn, *args = problem("lstm", T=17)
    ks = jnp.asarray([1, 3, 5, 17])
    f = jax.jit(jax.vmap(lambda k: jb.value_and_grad(step, loss_fn, argnums=ARGNUMS, truncation=k)(*args)[1]))
    batched = f(ks)
    for i, k in enumerate([1, 3, 5, 17]):
        ref = jax.grad(chunked_loop_loss(step, loss_fn, k), argnums=ARGNUMS)(*args)
        chex.assert_trees_all_close(jax.tree.map(lambda a: a[i], batched), ref, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("truncation", [4, (2, 5)])
def test_truncated_unroll_under_grad(truncation):
    """Any downstream function: the reference surrogate carries the same semantics for every cotangent."""
    step, _, params, carry, xs, _ = problem("gru", T=15)

    def objective(run):
        def f(p, c, x):
            final, ys = run(step, p, c, x, truncation=truncation)
            return jnp.sum(jnp.sin(ys) * jnp.arange(15.0)[:, None, None]) + jnp.sum(final ** 3)
        return f

    g = jax.jit(jax.grad(objective(jb.unroll), argnums=ARGNUMS))(params, carry, xs)
    ref = jax.grad(objective(jb.reference_unroll), argnums=ARGNUMS)(params, carry, xs)
    chex.assert_trees_all_close(g, ref, rtol=1e-10, atol=1e-13)


def test_williams_peng_with_an_integer_carry_leaf_and_output():
    """A step counter in the carry and the output (integer cotangents are float0) under (k1, k2)."""
    def step(p, c, x):
        h, n = c
        h = jnp.tanh(x @ p + h)
        return (h, n + 1), (h, n)

    args = (0.1 * jnp.ones((3, 4)), (jnp.zeros((2, 4)), jnp.zeros((), jnp.int32)), jnp.ones((9, 2, 3)), jnp.ones((9, 2, 4)))
    loss = lambda y, t: jnp.sum((y[0] - t) ** 2)
    assert jb.check_grads(step, loss, *args, truncation=(2, 5)) < 1e-12
