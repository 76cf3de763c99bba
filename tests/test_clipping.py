"""Per-step clipping and diagnostics against the surrogate oracles."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbptt as jb
from steps import problem

ARGNUMS = (0, 1, 2)


def _exact_adjoint_norms(step, loss_fn, params, carry, xs, targets, **options):
    """The diagnostics oracle: gradient with respect to a zero perturbation of each step's carry."""
    T = jax.tree.leaves(xs)[0].shape[0]
    eps = jax.tree.map(lambda c: jnp.zeros((T,) + c.shape, c.dtype), carry)

    def loss(eps):
        _, ys = jb.reference_unroll(step, params, carry, xs, perturbation=eps, **options)
        return jnp.sum(jax.vmap(loss_fn)(ys, targets))

    g = jax.grad(loss)(eps)
    return jnp.sqrt(sum(jnp.sum(a.reshape(T, -1) ** 2, axis=1) for a in jax.tree.leaves(g)))


@pytest.mark.parametrize("name", ["lstm", "gru", "two_layer", "tuple"])
def test_clipping_matches_oracle_at_every_strength(name):
    step, loss_fn, *args = problem(name, T=40)
    norms = _exact_adjoint_norms(step, loss_fn, *args)
    # the clip norm traced: one compilation of each side for every strength
    engine = jax.jit(lambda c: jb.value_and_grad(step, loss_fn, argnums=ARGNUMS, clip_norm=c, diagnostics=True)(*args))
    oracle = jax.jit(lambda c: jb.reference_value_and_grad(step, loss_fn, argnums=ARGNUMS, clip_norm=c)(*args))
    oracle_norms = jax.jit(lambda c: _exact_adjoint_norms(step, loss_fn, *args, clip_norm=c))
    for clip in [jnp.min(norms) / 4, jnp.median(norms), jnp.max(norms) * 2]:
        (_, _, diag), g = engine(clip)
        (_, _), ref = oracle(clip)
        chex.assert_trees_all_close(g, ref, rtol=1e-10, atol=1e-13)
        clipped_norms = oracle_norms(clip)
        np.testing.assert_allclose(diag.adjoint_norm, clipped_norms, rtol=1e-10)
        np.testing.assert_array_equal(diag.clipped, clipped_norms > clip)
    assert int(jnp.sum(norms > float(jnp.min(norms)) / 4)) == 40  # the tight clip clips every step


def test_no_clipping_equals_exact_and_clipping_changes_gradients():
    step, loss_fn, *args = problem("elman", T=30)
    exact = jb.value_and_grad(step, loss_fn)(*args)[1]
    loose = jb.value_and_grad(step, loss_fn, clip_norm=1e9)(*args)[1]
    tight = jb.value_and_grad(step, loss_fn, clip_norm=1e-3)(*args)[1]
    chex.assert_trees_all_close(loose, exact, rtol=1e-13)
    assert not jnp.allclose(tight["cell"]["W_hh"], exact["cell"]["W_hh"])


@pytest.mark.parametrize("truncation", [5, (3, 7)])
def test_clipping_with_truncation(truncation):
    step, loss_fn, *args = problem("lstm", T=33)
    for clip in (0.01, 0.1):
        (_, _), g = jax.jit(jb.value_and_grad(step, loss_fn, argnums=ARGNUMS, clip_norm=clip, truncation=truncation))(*args)
        (_, _), ref = jb.reference_value_and_grad(step, loss_fn, argnums=ARGNUMS, clip_norm=clip, truncation=truncation)(*args)
        chex.assert_trees_all_close(g, ref, rtol=1e-10, atol=1e-13)


def test_diagnostics_without_clipping_are_exact_adjoint_norms():
    step, loss_fn, *args = problem("gru", T=25)
    (_, _, diag), _ = jb.value_and_grad(step, loss_fn, diagnostics=True)(*args)
    np.testing.assert_allclose(diag.adjoint_norm, _exact_adjoint_norms(step, loss_fn, *args), rtol=1e-10)
    assert diag.adjoint_norm.shape == (25,) and not bool(jnp.any(diag.clipped))


def test_diagnostics_with_truncation_are_pre_cut_norms():
    step, loss_fn, *args = problem("elman", T=20)
    (_, _, diag), _ = jb.value_and_grad(step, loss_fn, truncation=4, diagnostics=True)(*args)
    np.testing.assert_allclose(diag.adjoint_norm, _exact_adjoint_norms(step, loss_fn, *args, truncation=4), rtol=1e-10)


def test_traced_clip_norm_under_vmap():
    step, loss_fn, *args = problem("elman", T=20)
    clips = jnp.asarray([0.01, 0.1, 1.0])
    g = jax.jit(jax.vmap(lambda c: jb.value_and_grad(step, loss_fn, clip_norm=c)(*args)[1]))(clips)
    for i, c in enumerate([0.01, 0.1, 1.0]):
        ref = jb.reference_value_and_grad(step, loss_fn, clip_norm=c)(*args)[1]
        chex.assert_trees_all_close(jax.tree.map(lambda a: a[i], g), ref, rtol=1e-10, atol=1e-13)


def test_clipped_unroll_under_grad():
    step, _, params, carry, xs, _ = problem("two_layer", T=12)
    f = lambda run: lambda p: jnp.sum(jnp.cos(run(step, p, carry, xs, clip_norm=0.05)[1]))
    chex.assert_trees_all_close(jax.grad(f(jb.unroll))(params), jax.grad(f(jb.reference_unroll))(params), rtol=1e-10)


def test_nan_propagates_through_clipping():
    step, loss_fn, params, carry, xs, targets = problem("elman", T=8)
    targets = targets.at[5, 0, 0].set(jnp.nan)
    (_, _, diag), g = jb.value_and_grad(step, loss_fn, clip_norm=0.1, diagnostics=True)(params, carry, xs, targets)
    assert bool(jnp.all(jnp.isnan(g["cell"]["W_hh"])))
    assert bool(jnp.all(jnp.isnan(diag.adjoint_norm[:6])))


@pytest.mark.parametrize("options", [dict(clip_norm=0.05), dict(truncation=(3, 7), clip_norm=0.2), dict(remat=4)])
def test_unroll_probe_gives_the_diagnostics(options):
    step, loss_fn, params, carry, xs, targets = problem("lstm", T=21)

    def loss(p, probe):
        _, ys = jb.unroll(step, p, carry, xs, probe=probe, **options)
        return jnp.sum(jax.vmap(loss_fn)(ys, targets))

    grads, diag = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, jb.diagnostics_probe(21))
    (_, _, ref_diag), ref_grads = jb.value_and_grad(step, loss_fn, diagnostics=True, **options)(params, carry, xs, targets)
    chex.assert_trees_all_close(grads, ref_grads, rtol=1e-10)
    np.testing.assert_allclose(diag.adjoint_norm, ref_diag.adjoint_norm, rtol=1e-10)
    np.testing.assert_array_equal(diag.clipped > 0, ref_diag.clipped)


def test_probe_with_reverse_is_indexed_by_time():
    step, _, params, carry, xs, _ = problem("elman", T=9)
    norms = lambda reverse: jax.grad(
        lambda probe: jnp.sum(jb.unroll(step, params, carry, xs, reverse=reverse, probe=probe)[1][-1] ** 2)
    )(jb.diagnostics_probe(9)).adjoint_norm
    forward, backward = norms(False), norms(True)
    assert bool(jnp.all(forward > 0))  # y_8 is computed last: every step's carry matters
    assert float(backward[8]) > 0 and bool(jnp.all(backward[:8] == 0))  # reversed, y_8 is computed first


def test_bad_probe():
    step, _, params, carry, xs, _ = problem("elman", T=9)
    with pytest.raises(ValueError, match=r"probe must be jaxbptt.diagnostics_probe\(9\)"):
        jb.unroll(step, params, carry, xs, probe=jb.diagnostics_probe(8))


@pytest.mark.parametrize("engine", ["reverse", "autodiff"])
def test_example_scope_clips_cotangents_beyond_the_float32_range(engine):
    """Per-example norms are scaled like the global one: a cotangent of 1e21 (its square overflows
    float32) clips to norm 1 per row, not to 0."""
    step = lambda q, h, x: (h + q * x, h + q * x)
    targets = jnp.zeros((4, 2, 3), jnp.float32).at[-1].set(1e21)
    f = jb.value_and_grad(step, lambda y, t: jnp.sum(y * t), argnums=1, clip_norm=1.0, clip_scope="example",
                          engine=engine)
    _, dcarry = f(jnp.float32(0.5), jnp.zeros((2, 3), jnp.float32), jnp.ones((4, 2, 3), jnp.float32), targets)
    np.testing.assert_allclose(jnp.linalg.norm(dcarry, axis=1), [1.0, 1.0], rtol=1e-5)


def test_example_scope_on_a_complex_carry():
    """An LRU's complex carry is clipped per example by its modulus, on every method."""
    import oracle

    cell = jb.lru(4)
    params = cell.init(jax.random.key(0), 3, jnp.float64)
    xs, targets = jax.random.normal(jax.random.key(1), (7, 2, 3)), jax.random.normal(jax.random.key(2), (7, 2, 3))
    loss_fn = lambda y, t: jnp.sum((y - t) ** 2)
    ref = oracle.value_and_grad(cell.step, loss_fn, params, cell.initial_carry((2,), jnp.float64), xs, targets,
                                clip_norm=0.3, clip_scope="example")[1][0]
    for engine in ("reverse", "autodiff"):
        f = jb.value_and_grad(cell.step, loss_fn, clip_norm=0.3, clip_scope="example", engine=engine)
        chex.assert_trees_all_close(f(params, cell.initial_carry((2,), jnp.float64), xs, targets)[1], ref, rtol=1e-10)
