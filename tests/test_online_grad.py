"""online_grad (RTRL, SnAp, UORO, TBPTT) against jax.grad of lax.scan; online training with them."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import jaxbptt as jb
from jax import lax
from jaxbptt._online import grad as _online_grad, sparsity as _online_sparsity, structure as _online_structure
from steps import mse, problem, scan_loss

T = 8


def exact(step, loss_fn, params, carry, xs, targets):
    return jax.value_and_grad(scan_loss(step, loss_fn), has_aux=True)(params, carry, xs, targets)


def flat(tree):
    return ravel_pytree(tree)[0]


def online(step, loss_fn, method):
    return jax.jit(jb.online_grad(step, loss_fn, method))


def cosine(a, b):
    a, b = flat(a), flat(b)
    return float(a @ b / jnp.linalg.norm(a) / jnp.linalg.norm(b))


# dict and tuple pytrees and a gated cell; the Elman and LSTM cells meet RTRL below, without jit and in float32
@pytest.mark.parametrize("name", ["two_layer", "tuple", "gru"])
def test_rtrl_equals_exact_bptt(name):
    step, loss_fn, params, carry, xs, targets = problem(name, T, B=2, D=3, H=3)
    (loss, final), grads = jax.jit(jb.online_grad(step, loss_fn, jb.RTRL()))(params, carry, xs, targets)
    (loss_ref, final_ref), grads_ref = exact(step, loss_fn, params, carry, xs, targets)
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-12)
    np.testing.assert_allclose(flat(final), flat(final_ref), rtol=1e-12)
    np.testing.assert_allclose(flat(grads), flat(grads_ref), rtol=1e-9, atol=1e-12)
    assert jax.tree.structure(grads) == jax.tree.structure(params)


def test_rtrl_without_jit_and_under_vmap():
    step, loss_fn, params, carry, xs, targets = problem("elman", T, B=2, D=3, H=3)
    f = jb.online_grad(step, loss_fn, jb.RTRL())
    (_, _), grads = f(params, carry, xs, targets)
    np.testing.assert_allclose(flat(grads), flat(exact(step, loss_fn, params, carry, xs, targets)[1]), rtol=1e-9)
    scales = jnp.array([0.5, 2.0])
    batched = jax.vmap(lambda s: f(params, carry, s * xs, targets)[1])(scales)
    for i, s in enumerate(scales):
        ref = exact(step, loss_fn, params, carry, s * xs, targets)[1]
        np.testing.assert_allclose(flat(jax.tree.map(lambda g: g[i], batched)), flat(ref), rtol=1e-9, atol=1e-12)


def _diagonal_step(p, h, x):
    """An element-wise recurrence: its carry Jacobian is diagonal."""
    h = jnp.tanh(h * p["a"][None] + x @ p["W"] + p["b"][None])
    return h, h @ p["V"]


def test_snap1_equals_rtrl_for_diagonal_carry_jacobian():
    k = jax.random.split(jax.random.key(0), 5)
    params = {"a": jax.random.normal(k[0], (4,)), "W": jax.random.normal(k[1], (3, 4)), "b": jnp.zeros(4),
              "V": jax.random.normal(k[2], (4, 2))}
    xs, targets = jax.random.normal(k[3], (T, 2, 3)), jax.random.normal(k[4], (T, 2, 2))
    carry = jnp.zeros((2, 4))
    (_, _), snap = online(_diagonal_step, mse, jb.SnAp(1))(params, carry, xs, targets)
    (_, _), ref = exact(_diagonal_step, mse, params, carry, xs, targets)
    np.testing.assert_allclose(flat(snap), flat(ref), rtol=1e-9, atol=1e-12)


def test_snap_improves_with_n_on_a_dense_elman():
    step, loss_fn, params, carry, xs, targets = problem("elman", T, B=2, D=3, H=4)
    ref = exact(step, loss_fn, params, carry, xs, targets)[1]
    cos = [cosine(online(step, loss_fn, jb.SnAp(n))(params, carry, xs, targets)[1], ref) for n in (1, 2)]
    # a dense recurrent matrix couples every unit to every other in two steps: SnAp-2 is RTRL
    assert cos[0] < 0.9999
    np.testing.assert_allclose(cos[1], 1.0, rtol=1e-12)


def test_snap_pattern_is_found_from_the_step():
    """A banded recurrence (unit i reads units i-1, i, i+1): the pattern widens by one band per step."""
    H = 5
    band = np.abs(np.arange(H)[:, None] - np.arange(H)[None]) <= 1

    def banded(p, h, x):
        h = jnp.tanh(h @ (p["U"] * band) + x @ p["W"])
        return h, h @ p["V"]

    params = {"U": jnp.ones((H, H)), "V": jnp.ones((H, 1)), "W": jnp.ones((2, H))}
    theta, unravel = ravel_pytree(params)
    flat_step = lambda th, c, x: banded(unravel(th), c, x)
    for n in (1, 2, 5):
        snap = jb.SnAp(n)
        mask, _ = _online_structure.pattern(flat_step, snap.n, snap.draws, theta, jnp.zeros(H), jnp.zeros(2))
        # a parameter of unit i (U[m, i] inside the band, W[k, i]) reaches unit j in n steps if |i - j| < n
        reach = np.abs(np.arange(H)[:, None] - np.arange(H)[None]) < n
        expected = np.concatenate([(band[:, :, None] & reach[None]).reshape(H * H, H), np.zeros((H, H), bool),
                                   np.broadcast_to(reach[None], (2, H, H)).reshape(2 * H, H)])
        np.testing.assert_array_equal(mask, expected)


def test_snap_pattern_is_structural_for_relu_units_and_embeddings():
    """An IRNN at initialisation (ReLU, identity recurrence: a diagonal carry Jacobian) has units
    inactive at every generic point; SnAp(1) must still equal BPTT. Through an embedding of integer
    ids, every row a token may select is in SnAp(2)'s pattern (a dense layer: SnAp(2) is RTRL)."""
    irnn = jb.elman(3, activation="relu", recurrent_init="identity")
    embedded = jb.with_readout(jb.embedding(jb.elman(3), 5, 2), 1)
    cases = [(irnn.step, jb.SnAp(1), irnn.init(jax.random.key(0), 2, jnp.float64),
              irnn.initial_carry((4,), jnp.float64), jax.random.normal(jax.random.key(10), (6, 4, 2)),
              jax.random.normal(jax.random.key(20), (6, 4, 3))),
             (embedded.step, jb.SnAp(2), embedded.init(jax.random.key(0), 5, jnp.float64),
              embedded.initial_carry((2,), jnp.float64), jax.random.randint(jax.random.key(1), (5, 2), 0, 5),
              jax.random.normal(jax.random.key(2), (5, 2, 1)))]
    for step, method, params, carry, xs, targets in cases:
        (_, _), snap = online(step, mse, method)(params, carry, xs, targets)
        np.testing.assert_allclose(flat(snap), flat(exact(step, mse, params, carry, xs, targets)[1]), rtol=1e-9,
                                   atol=1e-12)


def test_structural_surrogates_reach_every_input():
    """At a point where ReLUs, `where`, a lookup, a sort, a branch and a loop hide dependencies,
    the structural surrogate's Jacobian has every entry the function's can have somewhere."""
    @jax.custom_vjp
    def straight_through(x):
        return jnp.round(x)

    straight_through.defvjp(lambda x: (jnp.round(x), None), lambda _, g: (g,))

    def f(x, i):
        relu = lambda h: jnp.maximum(h, 0.0)
        return jnp.concatenate([
            jnp.where(x[0:3] > 0, x[0:3], 0.0), jax.nn.relu(x[3:6]), x[6:9][i][None], jnp.sort(x[9:12]),
            lax.cond(i > 0, lambda: 2 * x[12:15], lambda: jnp.zeros(3)),
            lax.scan(lambda h, _: (relu(h), None), x[15:18], None, length=2)[0],
            straight_through(x[18:20]), (x[20:22] > 0) * x[20:22]])

    x, i = -jnp.ones(22), jnp.asarray(0)
    blocks = [np.eye(3)] * 2 + [np.ones((1, 3)), np.ones((3, 3))] + [np.eye(3)] * 2 + [np.ones((2, 2)), np.eye(2)]
    expected = np.zeros((20, 22), bool)
    row = col = 0
    for b in blocks:
        expected[row:row + b.shape[0], col:col + b.shape[1]] = b
        row, col = row + b.shape[0], col + b.shape[1]
    np.testing.assert_array_equal(jax.jit(jax.jacrev(_online_sparsity.structural(f)))(x, i) != 0, expected)
    assert not np.array_equal(jax.jit(jax.jacrev(f))(x, i) != 0, expected)  # the plain Jacobian misses entries here
    with pytest.raises(ValueError, match="while_loop whose trip count may depend on the data"):
        jax.jacrev(_online_sparsity.structural(lambda h: lax.while_loop(lambda c: c[0] < 3, lambda c: c + 1, h)))(x)


@pytest.mark.parametrize("name", ["elman", "two_layer"])
def test_sparse_snap_equals_masked_dense(name, monkeypatch):
    """SnAp on its pattern's entries only equals the dense influence masked by the same pattern."""
    step, loss_fn, params, carry, xs, targets = problem(name, 4, B=2, D=2, H=3)
    layouts = [(n, sparse) for n in (1, 2) for sparse in (True, False)]

    def every_layout(*args):  # one compilation for the four
        results = []
        for n, sparse in layouts:
            monkeypatch.setattr(_online_structure.Sparse, "cheaper_than_dense", lambda self, s=sparse: s)
            results.append(jb.online_grad(step, loss_fn, jb.SnAp(n))(*args))
        return results

    results = dict(zip(layouts, jax.jit(every_layout)(params, carry, xs, targets)))
    for n in (1, 2):
        np.testing.assert_allclose(results[n, True][0][0], results[n, False][0][0], rtol=1e-12)
        np.testing.assert_allclose(flat(results[n, True][1]), flat(results[n, False][1]), rtol=1e-12, atol=1e-14)
    # left to choose, SnAp(1) stores only the pattern: for an Elman layer, each unit's fan-in per example
    monkeypatch.undo()
    if name == "elman":
        x = jax.tree.map(lambda a: a[0], xs)
        tracker = _online_grad.make_tracker(step, loss_fn, jb.SnAp(1), params, carry, x, max_influence_bytes=2**30)
        trace = tracker.init(flat(params), flat(carry))
        assert trace.shape == (2 * 3 * (3 + 2 + 1),)  # B x H x (H + D + 1)


def test_uoro_keeps_one_estimate_per_example():
    step, loss_fn, params, carry, xs, _ = problem("elman", T, B=2, D=3, H=3)
    x = jax.tree.map(lambda a: a[0], xs)
    trace = _online_grad.make_tracker(step, loss_fn, jb.UORO(), params, carry, x, max_influence_bytes=1).init(
        flat(params), flat(carry))
    assert trace[1].shape == (2, flat(params).size)
    # a step that couples the carry's rows (here the influence-balancing chain) is one example
    coupled = lambda p, c, x: (c @ p["A"], c[0])
    params = {"A": jnp.eye(3) + jnp.eye(3, k=1)}
    trace = _online_grad.make_tracker(coupled, mse, jb.UORO(), params, jnp.zeros(3), None, max_influence_bytes=1).init(
        flat(params), jnp.zeros(3))
    assert trace[1].shape == (1, 9)


def test_uoro_mean_over_keys_is_exact_bptt():
    step, loss_fn, params, carry, xs, targets = problem("elman", 6, B=2, D=2, H=3)
    ref = flat(exact(step, loss_fn, params, carry, xs, targets)[1])
    f = jb.online_grad(step, loss_fn, jb.UORO())
    n = 4000
    samples = jax.jit(jax.vmap(lambda k: flat(f(params, carry, xs, targets, key=k)[1])))(jax.random.split(jax.random.key(0), n))
    mean, stderr = samples.mean(0), samples.std(0) / np.sqrt(n)
    assert float(jnp.max(stderr)) > 0  # a random estimate, not the exact gradient itself
    # every coordinate within 5 standard errors (a 1e-6 chance per coordinate of failing by chance)
    np.testing.assert_array_less(jnp.abs(mean - ref), 5 * stderr + 1e-12)
    # and the bound is tight enough to reject a wrong estimator: the immediate gradient alone
    immediate = flat(online(step, loss_fn, jb.TBPTT(1, 1))(params, carry, xs, targets)[1])
    assert bool(jnp.any(jnp.abs(immediate - ref) > 5 * stderr))


def test_tbptt_method_is_value_and_grad_truncation():
    step, loss_fn, params, carry, xs, targets = problem("gru", T, B=2, D=3, H=3)
    (_, _), got = online(step, loss_fn, jb.TBPTT(2, 4))(params, carry, xs, targets)
    (_, _), ref = jb.value_and_grad(step, loss_fn, truncation=(2, 4))(params, carry, xs, targets)
    np.testing.assert_allclose(flat(got), flat(ref), rtol=1e-12)


def test_float32_rtrl():
    step, loss_fn, params, carry, xs, targets = problem("lstm", T, B=2, D=3, H=3, dtype=jnp.float32)
    (_, _), grads = online(step, loss_fn, jb.RTRL())(params, carry, xs, targets)
    assert flat(grads).dtype == jnp.float32
    np.testing.assert_allclose(flat(grads), flat(exact(step, loss_fn, params, carry, xs, targets)[1]), rtol=1e-4, atol=1e-6)


def test_float64_data_with_float32_params():
    """Each keeps its dtype: the loss one step's loss dtype, the carry and the params their own."""
    step, loss_fn, params, carry, xs, targets = problem("elman", 4, B=2, D=2, H=3)
    params32, carry32 = jax.tree.map(lambda a: a.astype(jnp.float32), (params, carry))
    (loss, final), grads = jb.online_grad(step, loss_fn, jb.RTRL())(params32, carry32, xs, targets)
    assert (loss.dtype, flat(final).dtype, flat(grads).dtype) == (jnp.float64, jnp.float32, jnp.float32)
    (loss_ref, _), grads_ref = exact(step, loss_fn, params, carry, xs, targets)
    np.testing.assert_allclose(flat(grads), flat(grads_ref), rtol=1e-4, atol=1e-6)
    trainer = jb.online(step, loss_fn, optax.sgd(0.1), jb.RTRL(), update_every=4)
    state, losses = trainer.update(trainer.init(params32, carry32), xs, targets)
    assert (losses.dtype, flat(state.carry).dtype, flat(state.params).dtype) == (jnp.float64, jnp.float32, jnp.float32)
    np.testing.assert_allclose(losses, [loss_ref], rtol=1e-5)


# ---- online training ------------------------------------------------------------------------------


def test_online_rtrl_one_update_is_one_exact_sgd_step():
    step, loss_fn, params, carry, xs, targets = problem("two_layer", T, B=2, D=3, H=3)
    trainer = jb.online(step, loss_fn, optax.sgd(0.1), jb.RTRL(), update_every=T)
    state, losses = jax.jit(trainer.update)(trainer.init(params, carry), xs, targets)
    (loss_ref, _), grads = exact(step, loss_fn, params, carry, xs, targets)
    np.testing.assert_allclose(losses, [loss_ref], rtol=1e-12)
    np.testing.assert_allclose(flat(state.params), flat(params) - 0.1 * flat(grads), rtol=1e-10)


def test_online_two_halves_equal_the_whole():
    method = jb.UORO()  # the path of every method, with the key folded by the step count
    step, loss_fn, params, carry, xs, targets = problem("elman", T, B=2, D=3, H=3)
    trainer = jb.online(step, loss_fn, optax.adam(0.01), method, update_every=2)
    state = trainer.init(params, carry, xs, key=jax.random.key(3))
    update = jax.jit(trainer.update)
    whole, losses = update(state, xs, targets)
    half, first = update(state, xs[:4], targets[:4])
    half, second = update(half, xs[4:], targets[4:])
    np.testing.assert_allclose(losses, jnp.concatenate([first, second]), rtol=1e-12)
    np.testing.assert_allclose(flat(whole.params), flat(half.params), rtol=1e-12)
    assert int(whole.steps) == T


def test_online_vmaps_over_seeds_and_learning_rates():
    step, loss_fn, params, carry, xs, targets = problem("elman", T, B=2, D=3, H=3)
    trainer = jb.online(step, loss_fn, optax.inject_hyperparams(optax.sgd)(learning_rate=0.1), jb.UORO(), update_every=4)

    def run(key, lr):
        state = trainer.init(params, carry, xs, key=key)
        state = state._replace(opt_state=state.opt_state._replace(hyperparams={"learning_rate": lr}))
        return trainer.update(state, xs, targets)

    keys, lrs = jax.random.split(jax.random.key(0), 3), jnp.array([0.0, 0.05, 0.1])
    states, losses = jax.jit(jax.vmap(run))(keys, lrs)
    assert losses.shape == (3, 2)
    run = jax.jit(run)  # one compilation for the three single runs
    for i in range(3):
        single, single_losses = run(keys[i], lrs[i])
        np.testing.assert_allclose(losses[i], single_losses, rtol=1e-10)
        np.testing.assert_allclose(flat(jax.tree.map(lambda a: a[i], states.params)), flat(single.params), rtol=1e-10)
    np.testing.assert_allclose(flat(jax.tree.map(lambda a: a[0], states.params)), flat(params))


def test_online_reset_starts_a_new_sequence():
    step, loss_fn, params, carry, xs, targets = problem("elman", T, B=2, D=3, H=3)
    trainer = jb.online(step, loss_fn, optax.sgd(0.0), jb.RTRL())
    state, _ = trainer.update(trainer.init(params, carry), xs, targets)
    state = trainer.reset(state, carry)
    assert not bool(jnp.any(state.trace))
    # with the learning rate 0, the second sequence's loss is the first's
    _, again = trainer.update(state, xs, targets)
    _, first = trainer.update(trainer.init(params, carry), xs, targets)
    np.testing.assert_allclose(again, first, rtol=1e-12)


def test_online_tbptt_method_delegates():
    step, loss_fn, params, carry, xs, targets = problem("gru", T, B=2, D=3, H=3)
    trainer = jb.online(step, loss_fn, optax.sgd(0.1), jb.TBPTT(2, 4))
    ref = jb.online_tbptt(step, loss_fn, optax.sgd(0.1), truncation=(2, 4))
    state, losses = trainer.update(trainer.init(params, carry, xs), xs, targets)
    ref_state, ref_losses = ref.update(ref.init(params, carry), xs, targets)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-12)
    np.testing.assert_allclose(flat(state.params), flat(ref_state.params), rtol=1e-12)
    state = trainer.reset(state, carry)
    assert not bool(jnp.any(state.valid))


# ---- bad input ------------------------------------------------------------------------------------


def test_errors():
    step, loss_fn, params, carry, xs, targets = problem("elman", T, B=2, D=3, H=3)
    with pytest.raises(ValueError, match="needs key="):
        jb.online_grad(step, loss_fn, jb.UORO())(params, carry, xs, targets)
    with pytest.raises(ValueError, match=r"\|carry\| x \|params\| = 6 x 33 .*max_influence_bytes=1000"):
        jb.online_grad(step, loss_fn, jb.RTRL(), max_influence_bytes=1000)(params, carry, xs, targets)
    with pytest.raises(ValueError, match="max_influence_bytes must be a positive int"):
        jb.online_grad(step, loss_fn, jb.RTRL(), max_influence_bytes=0)
    with pytest.raises(TypeError, match="method must be one of"):
        jb.online_grad(step, loss_fn, "rtrl")
    with pytest.raises(ValueError, match="SnAp needs n a positive int; got n=0"):
        jb.online_grad(step, loss_fn, jb.SnAp(0))
    with pytest.raises(ValueError, match="UORO needs eps > 0"):
        jb.online_grad(step, loss_fn, jb.UORO(eps=0.0))
    with pytest.raises(ValueError, match="k1 <= k2|1 <= k1"):
        jb.online_grad(step, loss_fn, jb.TBPTT(5, 2))
    with pytest.raises(TypeError, match=r"float leaves in carry; carry\[1\] has dtype int"):
        jb.online_grad(lambda p, c, x: ((c[0], c[1] + 1), c[0]), loss_fn, jb.RTRL())(
            params, (carry, jnp.zeros((), jnp.int32)), xs, jnp.zeros((T, 2, 3)))
    with pytest.raises(ValueError, match="needs init\\(..., key="):
        jb.online(step, loss_fn, optax.sgd(0.1), jb.UORO()).init(params, carry)
    with pytest.raises(ValueError, match="update_every a positive int; got update_every=0"):
        jb.online(step, loss_fn, optax.sgd(0.1), jb.RTRL(), update_every=0)
    with pytest.raises(ValueError, match="updates every k1 steps; got update_every=3"):
        jb.online(step, loss_fn, optax.sgd(0.1), jb.TBPTT(2, 4), update_every=3)
    with pytest.raises(ValueError, match="SnAp's sparsity pattern .* does not close over traced values"):
        jax.jit(lambda s: jb.online_grad(lambda p, c, x: step(p, s * c, x), loss_fn, jb.SnAp(1))(
            params, carry, xs, targets))(2.0)
    trainer = jb.online(step, loss_fn, optax.sgd(0.1), jb.RTRL(), update_every=3)
    with pytest.raises(ValueError, match="multiple of update_every=3; xs has 8"):
        trainer.update(trainer.init(params, carry), xs, targets)
