"""Per-step metrics (has_aux), batch-major data (time_axis=1) and per-example clipping
(clip_scope="example"), each against the autodiff oracle and the plain call."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbptt as jb
from steps import problem, sum_of_squares

ALL = (0, 1, 2)


def _with_metrics(loss_fn):
    def loss_and_aux(y, t):
        loss = loss_fn(y, t)
        return loss, {"loss": loss, "first": jax.tree.leaves(y)[0][..., 0]}

    return loss_and_aux


def test_has_aux_equals_plain_call_and_oracle():
    step, loss_fn, *args = problem("tuple", T=11)
    aux_loss = _with_metrics(loss_fn)
    (loss, final), grads = jb.value_and_grad(step, loss_fn, argnums=ALL, truncation=4)(*args)
    f = jax.jit(jb.value_and_grad(step, aux_loss, argnums=ALL, truncation=4, has_aux=True, diagnostics=True))
    (a_loss, a_final, aux, diag), a_grads = f(*args)
    chex.assert_trees_all_close((a_loss, a_final, a_grads), (loss, final, grads), rtol=1e-12)
    assert diag.adjoint_norm.shape == (11,)
    _, ys = jb.reference_unroll(step, *args[:3])
    chex.assert_trees_all_close(aux["loss"], jax.vmap(loss_fn)(ys, args[3]), rtol=1e-12)
    chex.assert_trees_all_close(aux["first"], jax.tree.leaves(ys)[0][..., 0], rtol=1e-12)
    (r_loss, r_final, r_aux), r_grads = jb.reference_value_and_grad(
        step, aux_loss, argnums=ALL, truncation=4, has_aux=True)(*args)
    chex.assert_trees_all_close((r_loss, r_final, r_aux, r_grads), (a_loss, a_final, aux, a_grads), rtol=1e-10)


def test_has_aux_zero_length_and_bad_loss():
    step, loss_fn, params, carry, xs, targets = problem("gru", T=4)
    (loss, _, aux), _ = jb.value_and_grad(step, _with_metrics(loss_fn), has_aux=True)(params, carry, xs[:0], targets[:0])
    assert float(loss) == 0.0 and aux["first"].shape == (0, 3)
    with pytest.raises(TypeError, match=r"has_aux=True, loss_fn\(y_t, target_t\) must return a pair"):
        jb.value_and_grad(step, loss_fn, has_aux=True)(params, carry, xs, targets)
    with pytest.raises(TypeError, match="has_aux must be a bool"):
        jb.value_and_grad(step, loss_fn, has_aux=1)


def _batch_major(tree):
    return jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1), tree)


def test_batch_major_equals_time_major():
    step, loss_fn, params, carry, xs, targets = problem("dict_input", T=13)
    options = dict(argnums=ALL, truncation=4, clip_norm=0.3)
    (loss, final), (gp, gc, gx) = jb.value_and_grad(step, loss_fn, **options)(params, carry, xs, targets)
    bxs, btargets = _batch_major(xs), _batch_major(targets)
    f = jax.jit(jb.value_and_grad(step, loss_fn, time_axis=1, **options))
    (b_loss, b_final), (bp, bc, bx) = f(params, carry, bxs, btargets)
    chex.assert_trees_all_close((b_loss, b_final, bp, bc, bx), (loss, final, gp, gc, _batch_major(gx)), rtol=1e-12)
    (r_loss, _), r_grads = jb.reference_value_and_grad(step, loss_fn, time_axis=1, **options)(params, carry, bxs, btargets)
    chex.assert_trees_all_close((r_loss, r_grads), (b_loss, (bp, bc, bx)), rtol=1e-10)
    final, ys = jb.unroll(step, params, carry, xs)
    b_final, bys = jb.unroll(step, params, carry, bxs, time_axis=1)
    chex.assert_trees_all_close((b_final, bys), (final, _batch_major(ys)), rtol=1e-12)

    def loss_of(unroll, data, **kw):
        return lambda p: jnp.sum(jax.tree.leaves(unroll(step, p, carry, data, truncation=3, **kw)[1])[0] ** 2)

    chex.assert_trees_all_close(jax.grad(loss_of(jb.unroll, bxs, time_axis=1))(params),
                                jax.grad(loss_of(jb.reference_unroll, bxs, time_axis=1))(params), rtol=1e-10)


def test_bad_time_axis():
    step, loss_fn, params, carry, xs, targets = problem("elman", T=5)
    for bad in (2, -1, True, "batch"):
        with pytest.raises(ValueError, match="time_axis must be 0 .* or 1"):
            jb.value_and_grad(step, loss_fn, time_axis=bad)
    with pytest.raises(ValueError, match="time_axis must be 0"):
        jb.unroll(step, params, carry, xs, time_axis=2)
    with pytest.raises(ValueError, match=r"time_axis=1 needs every leaf of xs shaped \(batch, T, ...\)"):
        jb.unroll(step, params, carry, jnp.ones((5,)), time_axis=1)


def test_per_example_clipping_equals_vmap_over_examples():
    step, _, params, carry, xs, targets = problem("lstm", T=15, B=4)
    clip = 0.05
    f = jb.value_and_grad(step, sum_of_squares, argnums=ALL, clip_norm=clip, clip_scope="example", diagnostics=True)
    (loss, final, diag), (gp, gc, gx) = jax.jit(f)(params, carry, xs, targets)
    one = jb.value_and_grad(step, sum_of_squares, argnums=ALL, clip_norm=clip)
    (v_loss, v_final), (vp, vc, vx) = jax.vmap(one, in_axes=(None, 0, 1, 1))(params, carry, xs, targets)
    chex.assert_trees_all_close((loss, final, gp, gc, gx),
                                (jnp.sum(v_loss), v_final, jax.tree.map(lambda a: jnp.sum(a, 0), vp), vc,
                                 _batch_major(vx)), rtol=1e-10)
    assert bool(jnp.all(diag.clipped))
    (_, _), batch_scope = jb.value_and_grad(step, sum_of_squares, clip_norm=clip)(params, carry, xs, targets)
    assert not np.allclose(batch_scope["cell"]["W_h"], gp["cell"]["W_h"])


def test_per_example_clipping_matches_oracle():
    step, loss_fn, *args = problem("two_layer", T=13)
    options = dict(argnums=ALL, truncation=(3, 7), clip_norm=0.02, clip_scope="example")
    _, grads = jax.jit(jb.value_and_grad(step, loss_fn, **options))(*args)
    _, ref = jb.reference_value_and_grad(step, loss_fn, **options)(*args)
    chex.assert_trees_all_close(grads, ref, rtol=1e-10, atol=1e-13)
    _, batch_ref = jb.reference_value_and_grad(step, loss_fn, **{**options, "clip_scope": "batch"})(*args)
    assert not np.allclose(grads[0]["W2"], batch_ref[0]["W2"])


def test_bad_clip_scope():
    step, loss_fn, params, carry, xs, targets = problem("elman", T=5, B=0)
    with pytest.raises(ValueError, match="clip_scope must be 'batch' .* or 'example'"):
        jb.value_and_grad(step, loss_fn, clip_scope="global")
    counting = lambda p, c, x: ((jnp.tanh(c[0] + x * p), c[1] + 1.0), c[0])  # a per-batch scalar in the carry
    xs, carry = jnp.ones((5, 3, 2)), (jnp.zeros((3, 2)), jnp.zeros(()))
    with pytest.raises(ValueError, match=r"clip_scope='example' needs every carry leaf .* carry\[1\]: scalar"):
        jb.value_and_grad(counting, loss_fn, clip_norm=1.0, clip_scope="example")(jnp.ones(()), carry, xs, xs)
