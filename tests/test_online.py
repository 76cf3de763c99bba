"""online_tbptt against a plain Python loop of the same semantics; the two-halves property; vmap."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxbptt as jb
from steps import problem


def reference_online(step, loss_fn, optimizer, k1, k2, params, carry, xs, targets, final_loss=None):
    """Chunk by chunk: re-run the window from the carry the previous window computed, update params.
    The losses are per step: each chunk's summed loss (and final loss of its last carry) over k1."""
    T = xs.shape[0]
    opt_state = optimizer.init(params)
    start_carry, losses = carry, []
    for j in range(T // k1):
        s, e = (j + 1) * k1 - k2, (j + 1) * k1

        def window_loss(p):
            c, total, after = start_carry, 0.0, {}
            for t in range(max(s, 0), e):
                c, y = step(p, c, xs[t])
                after[t] = c
                if t >= j * k1:
                    total = total + loss_fn(y, targets[t])
            return total + (final_loss(c) if final_loss else 0.0), after

        (loss, after), grads = jax.value_and_grad(window_loss, has_aux=True)(params)
        next_start = s + k1
        start_carry = after[next_start - 1] if next_start - 1 >= max(s, 0) else start_carry
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        losses.append(loss / k1)
    return params, jnp.stack(losses)


@pytest.mark.parametrize("k1, k2, final_loss", [(3, 7, None), (4, 4, None), (2, 9, lambda h: jnp.sum(h**2))])
def test_matches_python_loop(k1, k2, final_loss):
    step, loss_fn, params, carry, xs, targets = problem("gru", T=12)  # whole chunks; windows reach before step 0
    trainer = jb.online_tbptt(step, loss_fn, optax.adam(0.05), truncation=(k1, k2), final_loss=final_loss)
    state, losses = jax.jit(trainer.update)(trainer.init(params, carry), xs, targets)
    ref_params, ref_losses = reference_online(step, loss_fn, optax.adam(0.05), k1, k2, params, carry, xs, targets,
                                              final_loss)
    chex.assert_trees_all_close(losses, ref_losses, rtol=1e-10)
    chex.assert_trees_all_close(state.params, ref_params, rtol=1e-10, atol=1e-12)
    assert int(state.chunks) == xs.shape[0] // k1


def test_two_halves_equal_the_whole():
    step, loss_fn, params, carry, xs, targets = problem("two_layer", T=24)
    trainer = jb.online_tbptt(step, loss_fn, optax.sgd(0.1), truncation=(4, 10))
    update = jax.jit(trainer.update)
    whole, whole_losses = update(trainer.init(params, carry), xs, targets)
    half, first = update(trainer.init(params, carry), xs[:12], targets[:12])
    half, second = update(half, xs[12:], targets[12:])
    chex.assert_trees_all_close(half, whole, rtol=1e-12)
    chex.assert_trees_all_close(jnp.concatenate([first, second]), whole_losses, rtol=1e-12)


def test_vmap_over_learning_rates_and_seeds():
    step, loss_fn, params, carry, xs, targets = problem("elman", T=12)
    trainer = jb.online_tbptt(step, loss_fn, optax.inject_hyperparams(optax.sgd)(learning_rate=0.1), truncation=(3, 6))
    rates = jnp.asarray([0.01, 0.3])
    seeds = jax.vmap(lambda k: jax.tree.map(lambda a: a + 0.01 * jax.random.normal(k, a.shape), params))(
        jax.random.split(jax.random.key(7), 2))

    def run(lr, p):
        state = trainer.init(p, carry)
        state = state._replace(opt_state=state.opt_state._replace(hyperparams={"learning_rate": lr}))
        return trainer.update(state, xs, targets)

    states, losses = jax.jit(jax.vmap(run))(rates, seeds)
    for i in range(2):
        ref_params, ref_losses = reference_online(step, loss_fn, optax.sgd(float(rates[i])), 3, 6,
                                                  jax.tree.map(lambda a: a[i], seeds), carry, xs, targets)
        chex.assert_trees_all_close(losses[i], ref_losses, rtol=1e-10)
        chex.assert_trees_all_close(jax.tree.map(lambda a: a[i], states.params), ref_params, rtol=1e-10)


def test_training_reduces_the_loss():
    step, loss_fn, params, carry, xs, _ = problem("lstm", T=8)
    xs = jnp.tile(xs, (20, 1, 1))
    targets = xs[..., :3] - jnp.roll(xs[..., :3], 1, axis=0)  # learnable from the current and last input
    trainer = jb.online_tbptt(step, loss_fn, optax.adam(0.05), truncation=(8, 16))
    _, losses = jax.jit(trainer.update)(trainer.init(params, carry), xs, targets)
    assert float(jnp.mean(losses[-3:])) < 0.5 * float(jnp.mean(losses[:3]))


def test_bad_input():
    step, loss_fn, params, carry, xs, targets = problem("elman", T=10)
    with pytest.raises(ValueError, match=r"multiple of k1=3; xs has 10"):
        jb.online_tbptt(step, loss_fn, optax.sgd(0.1), truncation=(3, 5)).update(
            jb.online_tbptt(step, loss_fn, optax.sgd(0.1), truncation=(3, 5)).init(params, carry), xs, targets)
    with pytest.raises(ValueError, match=r"truncation=\(k1, k2\) needs 1 <= k1 <= k2"):
        jb.online_tbptt(step, loss_fn, optax.sgd(0.1), truncation=(5, 3))
    with pytest.raises(TypeError, match="online_tbptt needs truncation=\\(k1, k2\\)"):
        jb.online_tbptt(step, loss_fn, optax.sgd(0.1), truncation=None)


def test_update_compiles_once_and_reset_starts_a_new_stream():
    step, loss_fn, params, carry, xs, targets = problem("gru", T=12)
    trainer = jb.online_tbptt(step, loss_fn, optax.adam(0.05), truncation=(3, 5))
    update = jax.jit(trainer.update)
    state = trainer.init(params, carry, xs)
    for _ in range(3):
        state, _ = update(state, xs, targets)
    assert update._cache_size() == 1
    fresh = trainer.reset(state, carry)
    again, losses = update(fresh, xs, targets)
    assert update._cache_size() == 1
    chex.assert_trees_all_equal((fresh.params, fresh.opt_state, fresh.chunks), (state.params, state.opt_state, state.chunks))
    # equal to a new trainer state at the current params, with the optimizer's state carried over
    new = trainer.init(state.params, carry, xs)._replace(opt_state=state.opt_state, chunks=state.chunks)
    chex.assert_trees_all_close(update(new, xs, targets), (again, losses), rtol=1e-12)


def test_batch_major_stream_and_outputs():
    step, loss_fn, params, carry, xs, targets = problem("elman", T=12)
    options = dict(truncation=(3, 5), return_outputs=True)
    trainer = jb.online_tbptt(step, loss_fn, optax.sgd(0.1), **options)
    state, losses, ys = jax.jit(trainer.update)(trainer.init(params, carry, xs), xs, targets)
    batch_major = lambda a: jnp.swapaxes(a, 0, 1)
    b_trainer = jb.online_tbptt(step, loss_fn, optax.sgd(0.1), time_axis=1, **options)
    b_state, b_losses, b_ys = jax.jit(b_trainer.update)(b_trainer.init(params, carry, batch_major(xs)),
                                                        batch_major(xs), batch_major(targets))
    chex.assert_trees_all_close((b_state, b_losses, b_ys), (state, losses, batch_major(ys)), rtol=1e-12)
    # the first chunk's outputs are those of the initial parameters
    _, first = jb.unroll(step, params, carry, xs[:3])
    chex.assert_trees_all_close(ys[:3], first, rtol=1e-12)
    np.testing.assert_allclose(losses[0], jnp.mean(jax.vmap(loss_fn)(first, targets[:3])), rtol=1e-12)
    with pytest.raises(ValueError, match="time_axis must be 0"):
        jb.online_tbptt(step, loss_fn, optax.sgd(0.1), truncation=3, time_axis=2)
