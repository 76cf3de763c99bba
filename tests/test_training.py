"""Tasks, the train step, compiled training loops and vmapped sweeps."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxbptt as jb
from jaxbptt import tasks


def test_adding_task():
    xs, targets = tasks.adding(jax.random.key(0), 16, 30, jnp.float64)
    assert xs.shape == (30, 16, 2) and xs.dtype == jnp.float64 and targets.value.shape == (30, 16, 1)
    markers = xs[..., 1]
    np.testing.assert_array_equal(markers.sum(0), 2.0)
    assert bool(jnp.all(markers[:15].sum(0) == 1)) and bool(jnp.all(markers[15:].sum(0) == 1))
    np.testing.assert_allclose(targets.value[-1, :, 0], (xs[..., 0] * markers).sum(0))
    np.testing.assert_array_equal(targets.weight.sum(0), 1.0)
    again = tasks.adding(jax.random.key(0), 16, 30, jnp.float64)
    chex.assert_trees_all_equal((xs, targets), again)
    assert not np.array_equal(xs, tasks.adding(jax.random.key(1), 16, 30, jnp.float64)[0])
    # always predicting 1 scores the baseline in expectation
    xs, targets = tasks.adding(jax.random.key(2), 20000, 10)
    y = jnp.ones((20000, 1))
    assert abs(float(tasks.weighted_mse(y, jax.tree.map(lambda a: a[-1], targets))) - tasks.ADDING_BASELINE_MSE) < 0.01


def test_copy_memory_task():
    xs, targets = tasks.copy_memory(jax.random.key(0), 4, delay=7, length=5, symbols=6)
    assert xs.shape == (17, 4, 8) and targets.value.dtype == jnp.int32
    np.testing.assert_array_equal(jnp.argmax(xs[:5], -1), targets.value[-5:])  # recall what was read
    assert bool(jnp.all(jnp.argmax(xs[11], -1) == 7))  # the marker
    chex.assert_trees_all_equal(tasks.copy_memory(jax.random.key(0), 4, 7, 5, 6), (xs, targets))
    with pytest.raises(ValueError, match="copy_memory needs delay >= 1"):
        tasks.copy_memory(jax.random.key(0), 4, delay=0)


def test_digits_split_is_fixed():
    train_xs, train_t = tasks.digits("train")
    test_xs, test_t = tasks.digits("test")
    assert train_xs.shape == (64, 1437, 1) and test_xs.shape == (64, 360, 1)
    assert float(train_xs.max()) <= 1.0 and train_t.value.dtype == jnp.int32
    np.testing.assert_array_equal(test_xs, tasks.digits("test")[0])
    # the split is a partition: no test image appears in the training set
    train_rows = {tuple(row) for row in np.asarray(train_xs[:, :, 0]).T}
    overlap = sum(tuple(row) in train_rows for row in np.asarray(test_xs[:, :, 0]).T)
    assert overlap <= 2  # a few handwritten digits are pixel-identical duplicates in the data set
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        tasks.digits("valid")


def _small():
    model = jb.with_readout(jb.gru(8), 1)
    params = model.init(jax.random.key(0), 2, jnp.float64)
    xs, targets = tasks.adding(jax.random.key(1), 16, 12, jnp.float64)
    return model, params, model.initial_carry((16,), jnp.float64), xs, targets


def test_train_step_equals_hand_rolled_optax():
    model, params, carry, xs, targets = _small()
    opt = optax.adam(0.01)
    train_step = jb.make_train_step(model.step, tasks.weighted_mse, opt, truncation=4, clip_norm=0.5)
    p1, s1, loss, final = jax.jit(train_step)(params, opt.init(params), carry, xs, targets)
    (ref_loss, ref_final), grads = jb.value_and_grad(model.step, tasks.weighted_mse, truncation=4, clip_norm=0.5)(
        params, carry, xs, targets)
    updates, s2 = opt.update(grads, opt.init(params), params)
    chex.assert_trees_all_close((p1, s1, loss, final), (optax.apply_updates(params, updates), s2, ref_loss, ref_final),
                                rtol=1e-12)


def test_training_decreases_the_loss():
    model, params, carry, _, _ = _small()
    opt = optax.adam(0.02)
    batches = lambda key: (carry, *tasks.adding(key, 16, 12, jnp.float64))
    run = jax.jit(jb.train_loop(jb.make_train_step(model.step, tasks.weighted_mse, opt), batches, 300))
    _, _, losses = run(params, opt.init(params), jax.random.key(3))
    assert float(losses[-50:].mean()) < 0.5 * float(losses[:50].mean())


def test_vmapped_sweep_equals_separate_runs():
    """Learning rates, seeds, clip norms and traced truncation lengths, vmapped in one call."""
    model, _, carry, _, _ = _small()
    opt = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
    batches = lambda key: (carry, *tasks.adding(key, 16, 12, jnp.float64))

    inits = [model.init(jax.random.key(s), 2, jnp.float64) for s in range(2)]  # outside vmap: see train_loop

    def run(lr, params, seed, clip, k):
        step = jb.make_train_step(model.step, tasks.weighted_mse, opt, clip_norm=clip, truncation=k)
        state = opt.init(params)
        state.hyperparams["learning_rate"] = lr
        return jb.train_loop(step, batches, 20)(params, state, jax.random.key(seed))[2]

    # four runs, each with its own learning rate, seed, clip norm and truncation length, in one call
    lrs, seeds = jnp.asarray([0.03, 0.1, 0.03, 0.1]), jnp.asarray([0, 0, 1, 1])
    clips, ks = jnp.asarray([0.1, 10.0, 0.5, 0.5]), jnp.asarray([3, 12, 4, 4])
    stacked = jax.tree.map(lambda *a: jnp.stack(a)[seeds], *inits)
    sweep = jax.jit(jax.vmap(run))(lrs, stacked, seeds, clips, ks)
    single = jax.jit(run)  # one separate run at a time (one compilation for all of them)
    for i in range(4):
        alone = single(lrs[i], inits[int(seeds[i])], seeds[i], clips[i], ks[i])
        np.testing.assert_allclose(sweep[i], alone, rtol=1e-12)


def test_experiments_smoke_run(tmp_path):
    from examples import experiments

    results = experiments.main(["--smoke", "--seeds", "1", "--out", str(tmp_path / "curves.png")])
    # the first model of each experiment; exact and truncated runs of the truncation and copy ones
    assert [(r.experiment.split(",")[0], r.model) for r in results] == [
        ("adding", "tanh RNN"), ("adding", "LSTM, truncation=2"), ("adding", "LSTM, truncation=5"),
        ("copy", "LSTM, exact"), ("copy", "LSTM, truncation=2"),
        ("sequential digits (64 steps)", "tanh RNN (lr 0.003)")]
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert all(np.all(np.isfinite(r.values)) for r in results)


def test_train_step_takes_every_gradient_option():
    model, params, carry, xs, targets = _small()
    bxs, btargets = jax.tree.map(lambda a: jnp.swapaxes(a, 0, 1), (xs, targets))

    def loss_and_aux(y, t):
        loss = tasks.weighted_mse(y, t)
        return loss, {"loss": loss}

    options = dict(truncation=(3, 5), clip_norm=0.05, clip_scope="example", time_axis=1)
    step = jax.jit(jb.make_train_step(model.step, loss_and_aux, optax.sgd(0.1), diagnostics=True, has_aux=True,
                                      **options))
    new_params, _, loss, final, extras = step(params, optax.sgd(0.1).init(params), carry, bxs, btargets)
    (ref_loss, ref_final, aux), grads = jb.reference_value_and_grad(model.step, loss_and_aux, has_aux=True, **options)(
        params, carry, bxs, btargets)
    chex.assert_trees_all_close((new_params, loss, final, extras["aux"]),
                                (jax.tree.map(lambda p, g: p - 0.1 * g, params, grads), ref_loss, ref_final, aux),
                                rtol=1e-10)
    assert set(extras) == {"aux", "diag"} and extras["diag"].adjoint_norm.shape == (12,)
    with pytest.raises(TypeError, match="make_train_step cannot take the option argnums=.* the optimizer updates"):
        jb.make_train_step(model.step, tasks.weighted_mse, optax.sgd(0.1), argnums=(0, 1))
    with pytest.raises(TypeError, match="make_train_step got an unknown option 'clipnorm'"):
        jb.make_train_step(model.step, tasks.weighted_mse, optax.sgd(0.1), clipnorm=1.0)


def test_train_loop_evaluates_and_stacks_metrics():
    model, params, carry, _, _ = _small()
    opt = optax.adam(1e-2)
    step = jb.make_train_step(model.step, tasks.weighted_mse, opt, diagnostics=True)
    batch = lambda key: (carry, *tasks.adding(key, 16, 12, jnp.float64))
    held_out = batch(jax.random.key(7))
    evaluate = lambda p: jb.value_and_grad(model.step, tasks.weighted_mse)(p, *held_out)[0][0]
    run = jax.jit(jb.train_loop(step, batch, 6, eval_fn=evaluate, eval_every=3))
    final, _, losses, history = run(params, opt.init(params), jax.random.key(0))
    plain_final, _, plain_losses, plain_history = jax.jit(jb.train_loop(step, batch, 6))(params, opt.init(params), jax.random.key(0))
    chex.assert_trees_all_close((final, losses, plain_history["diag"]), (plain_final, plain_losses, history["diag"]), rtol=1e-12)
    assert history["eval"].shape == (2,) and history["diag"].adjoint_norm.shape == (6, 12)
    np.testing.assert_allclose(history["eval"][-1], evaluate(final), rtol=1e-10)
    with pytest.raises(ValueError, match="eval_every must be a positive int dividing iterations=6; got eval_every=4"):
        jb.train_loop(step, batch, 6, eval_fn=evaluate, eval_every=4)
    with pytest.raises(TypeError, match="eval_every needs eval_fn"):
        jb.train_loop(step, batch, 6, eval_every=3)
    # a batch_fn that returns the wrong tuple: the error names batch_fn, what it returned and what it must
    run_on = lambda batch_fn: jb.train_loop(step, batch_fn, 2)(params, opt.init(params), jax.random.key(0))
    with pytest.raises(TypeError, match=r"batch_fn\(key\) must return a tuple \(carry, xs, targets\).* got a tuple of 2 "
                                        r"entries, \(float64\[12,16,2\], Targets\(value=float64\[12,16,1\]"):
        run_on(lambda key: tasks.adding(key, 16, 12, jnp.float64))
    with pytest.raises(ValueError, match=r"train_step failed on the batch from batch_fn, \(carry, xs, targets\) = "
                                         r"\(float64\[12,16,2\], .*, float64\[16,8\]\) .*targets must have the same"):
        run_on(lambda key: (*tasks.adding(key, 16, 12, jnp.float64), carry))
