"""Unrolled optimisation: final-state losses in online_grad and online, and the perturbation
estimators ES, PES and NRES, against plain references written from their definitions."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax
from jax.flatten_util import ravel_pytree

import jaxbptt as jb
from steps import mse

T, B, D, H = 7, 2, 3, 4
_k = jax.random.split(jax.random.key(0), 6)
A = 0.6 * jnp.eye(H) + 0.3 * jax.random.normal(_k[0], (H, H)) / jnp.sqrt(H)
PARAMS = {"B": jax.random.normal(_k[1], (D, H)) / jnp.sqrt(D), "b": 0.1 * jnp.ones(H)}
XS = jax.random.normal(_k[2], (T, B, D))
TARGETS = jax.random.normal(_k[3], (T, B, H))
CARRY = 0.1 * jnp.ones((B, H))


def linear_step(p, h, x):
    """Linear in the parameters: every loss below is quadratic in them."""
    h = h @ A + x @ p["B"] + p["b"][None]
    return h, h


def energy(h):
    return jnp.sum(h**2)


def rounding_sampling_step(p, h, x):
    """Rounds its state and drops units at random with the key in its input: autodiff gives no
    useful gradient, the perturbation estimators only run it forward."""
    features, key = x
    h = jnp.round(10 * jnp.tanh(h @ A + features @ p["B"] + p["b"][None])) / 10
    return jnp.where(jax.random.bernoulli(key, 0.8, h.shape), h, 0.0), h


def flat(tree):
    return ravel_pytree(tree)[0]


def scan_value_and_grad(step, loss_fn, final_loss):
    """The oracle: jax.grad of a plain lax.scan of the per-step losses plus the final loss."""

    def loss(params):
        def body(c, inputs):
            c, y = step(params, c, inputs[0])
            return c, loss_fn(y, inputs[1])

        final, losses = lax.scan(body, CARRY, (XS, TARGETS))
        return jnp.sum(losses) + final_loss(final), final

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(PARAMS)


def reference_perturbation(method, step, loss_fn, final_loss, params, carry, xs, targets, key):
    """ES, PES and NRES from their definitions, pair by pair, window by window (Python loops),
    window j's noise `sigma * normal(fold_in(key, first step of window j))`, as documented."""
    theta, unravel = ravel_pytree(params)
    pairs, sigma = method.pairs, method.sigma
    width = T if isinstance(method, jb.ES) or method.window is None else method.window
    at = lambda tree, t: jax.tree.map(lambda a: a[t], tree)

    def run(th, c, lo, hi):
        total = 0.0
        for t in range(lo, hi):
            c, y = step(unravel(th), c, at(xs, t))
            total = total + loss_fn(y, at(targets, t))
        return c, total + (final_loss(c) if hi == T else 0.0)

    plus, minus, xi, episode_noise, grad = [carry] * pairs, [carry] * pairs, 0.0, None, 0.0
    for lo in range(0, T, width):
        fresh = sigma * jax.random.normal(jax.random.fold_in(key, lo), (pairs, theta.size))
        if isinstance(method, jb.NRES):
            episode_noise = fresh if episode_noise is None else episode_noise
            eps, weight = episode_noise, episode_noise
        elif isinstance(method, jb.PES):
            eps, xi = fresh, xi + fresh
            weight = xi
        else:
            eps, weight = fresh, fresh
        for i in range(pairs):
            start_plus, start_minus = (carry, carry) if isinstance(method, jb.ES) else (plus[i], minus[i])
            plus[i], loss_plus = run(theta + eps[i], start_plus, lo, min(lo + width, T))
            minus[i], loss_minus = run(theta - eps[i], start_minus, lo, min(lo + width, T))
            grad = grad + weight[i] * (loss_plus - loss_minus) / (2 * pairs * sigma**2)
    return unravel(grad)


METHODS = [jb.ES(0.1, pairs=2), jb.PES(0.1, pairs=2, window=3), jb.NRES(0.1, pairs=2, window=3)]


def test_perturbation_estimators_match_their_definition():
    """On a step with rounding and sampling (a key in its input), with a per-step and a final
    loss: each estimator equals its definition; the loss and final carry are the unperturbed run's."""
    xs = (XS, jax.random.split(jax.random.key(5), T))
    key = jax.random.key(9)

    def all_methods(params, carry, xs, targets, key):
        return [jb.online_grad(rounding_sampling_step, mse, m, final_loss=energy)(params, carry, xs, targets, key=key)
                for m in METHODS]

    results = jax.jit(all_methods)(PARAMS, CARRY, xs, TARGETS, key)
    final, losses = lax.scan(lambda c, x: rounding_sampling_step(PARAMS, c, x), CARRY, xs)
    loss = jnp.sum(jax.vmap(mse)(losses, TARGETS)) + energy(final)
    # ES is checked through NRES below
    for method, ((got_loss, got_final), grads) in list(zip(METHODS, results))[1:]:
        ref = reference_perturbation(method, rounding_sampling_step, mse, energy, PARAMS, CARRY, xs, TARGETS, key)
        np.testing.assert_allclose(flat(grads), flat(ref), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(got_loss, loss, rtol=1e-12)
        np.testing.assert_allclose(got_final, final, rtol=1e-12)
        assert float(jnp.linalg.norm(flat(grads))) > 0
    # with the parameters fixed, reusing one noise per episode is ES over the whole sequence
    np.testing.assert_allclose(flat(results[2][1]), flat(results[0][1]), rtol=1e-10)


def test_final_loss_gradients_and_unbiased_estimators():
    """loss = sum_t mse + |h_T|^2, quadratic in the parameters: RTRL is exact, TBPTT is the gradient
    of its surrogate, and the mean over keys of UORO, ES, PES and NRES is within 5 standard errors
    of the exact gradient (exact in expectation for antithetic ES on a quadratic)."""
    (loss_ref, final_ref), grads_ref = scan_value_and_grad(linear_step, mse, energy)
    (loss, final), rtrl = jax.jit(jb.online_grad(linear_step, mse, jb.RTRL(), final_loss=energy))(
        PARAMS, CARRY, XS, TARGETS)
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-12)
    np.testing.assert_allclose(final, final_ref, rtol=1e-12)
    np.testing.assert_allclose(flat(rtrl), flat(grads_ref), rtol=1e-10)

    # TBPTT(2, 3): the final loss is an error of the last chunk, re-run over its window of 3 steps
    window_start = max(((T - 1) // 2 + 1) * 2 - 3, 0)

    def truncated(params):
        carries = [CARRY]  # the forward pass at fixed parameters: the stopped carries
        for t in range(T):
            carries.append(linear_step(PARAMS, carries[-1], XS[t])[0])
        total = 0.0
        for t in range(T):  # step t's loss through its chunk's window, from the stopped carry
            start = max((t // 2 + 1) * 2 - 3, 0)
            c = carries[start]
            for s in range(start, t + 1):
                c, y = linear_step(params, c, XS[s])
            total = total + mse(y, TARGETS[t])
        c = carries[window_start]
        for s in range(window_start, T):
            c, _ = linear_step(params, c, XS[s])
        return total + energy(c)

    (_, _), tbptt = jax.jit(jb.online_grad(linear_step, mse, jb.TBPTT(2, 3), final_loss=energy))(PARAMS, CARRY, XS,
                                                                                                  TARGETS)
    np.testing.assert_allclose(flat(tbptt), flat(jax.grad(truncated)(PARAMS)), rtol=1e-10)

    methods = [jb.UORO()] + METHODS
    n = 2000

    def samples(key):
        return [flat(jb.online_grad(linear_step, mse, m, final_loss=energy)(PARAMS, CARRY, XS, TARGETS, key=key)[1])
                for m in methods]

    draws = jax.jit(jax.vmap(samples))(jax.random.split(jax.random.key(1), n))
    ref = flat(grads_ref)
    for method, g in zip(methods, draws):
        mean, stderr = g.mean(0), g.std(0) / np.sqrt(n)
        assert float(jnp.min(stderr)) > 0, method  # random estimates
        np.testing.assert_array_less(jnp.abs(mean - ref), 5 * stderr, err_msg=repr(method))
        # the bound rejects a biased estimate: TBPTT(2, 3)'s gradient
        assert bool(jnp.any(jnp.abs(mean - flat(tbptt)) > 5 * stderr)), method


def test_no_per_step_loss_no_targets_no_outputs():
    """loss_fn=None with a step returning y=None, targets None; zero steps; TBPTT with a final loss
    and no per-step loss."""
    silent = lambda p, h, x: (linear_step(p, h, x)[0], None)
    (loss_ref, _), grads_ref = scan_value_and_grad(linear_step, lambda y, t: 0.0 * jnp.sum(y), energy)
    for method in [jb.RTRL(), jb.TBPTT(T, T)]:
        (loss, _), grads = jax.jit(jb.online_grad(silent, None, method, final_loss=energy))(PARAMS, CARRY, XS)
        np.testing.assert_allclose(loss, loss_ref, rtol=1e-12)
        np.testing.assert_allclose(flat(grads), flat(grads_ref), rtol=1e-10, err_msg=repr(method))
    # targets=None is for no per-step loss only, as in value_and_grad
    with pytest.raises(ValueError, match="targets=None is only for a call with no per-step loss"):
        jb.online_grad(linear_step, mse, jb.RTRL())(PARAMS, CARRY, XS)
    (loss, final), grads = jb.online_grad(silent, None, jb.PES(0.1), final_loss=energy)(
        PARAMS, CARRY, XS[:0], key=jax.random.key(0))
    np.testing.assert_allclose(loss, energy(CARRY))
    assert not np.any(flat(grads))


def record_sum():
    """An optax transformation that keeps the sum of the gradients it sees and changes nothing:
    `online`'s per-window estimates, summed, with the parameters fixed."""
    return optax.GradientTransformation(lambda p: jax.tree.map(jnp.zeros_like, p),
                                        lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g),
                                                              jax.tree.map(jnp.add, s, g)))


def test_online_windows_equal_online_grad_and_the_state_is_fixed():
    """A lax.scan of update from init runs (the state's structure is fixed at init); with the
    parameters fixed, online's window estimates sum to online_grad's: PES and NRES, and RTRL with
    the final loss at the end of each of its two windows; reset starts a new episode."""
    key = jax.random.key(4)
    xs, targets = XS[:6], TARGETS[:6]
    halves = jax.tree.map(lambda a: a.reshape((2, 3) + a.shape[1:]), (xs, targets))
    for method, final_loss in [(jb.PES(0.1, pairs=2, window=3), None), (jb.NRES(0.1, pairs=2), None),
                               (jb.RTRL(), energy)]:
        trainer = jb.online(linear_step, mse, record_sum(), method, update_every=3, final_loss=final_loss)
        start = trainer.init(PARAMS, CARRY, xs, key=key)
        state, losses = jax.jit(lambda s: lax.scan(lambda s, d: trainer.update(s, *d), s, halves))(start)
        assert jax.tree.structure(state) == jax.tree.structure(start)
        if isinstance(method, jb.RTRL):  # the final loss after step 2, and after step 5 with the per-step losses
            (first, _), grads = jb.online_grad(linear_step, None, method, final_loss=energy)(PARAMS, CARRY, xs[:3])
            (rest, _), more = jb.online_grad(linear_step, mse, method, final_loss=energy)(PARAMS, CARRY, xs, targets)
            loss, grads = first + rest, jax.tree.map(jnp.add, grads, more)
        else:
            (loss, _), grads = jb.online_grad(linear_step, mse, method._replace(window=3))(PARAMS, CARRY, xs, targets,
                                                                                          key=key)
        np.testing.assert_allclose(flat(state.opt_state), flat(grads), rtol=1e-10, err_msg=repr(method))
        np.testing.assert_allclose(jnp.sum(losses), loss, rtol=1e-12)
        fresh = trainer.reset(state, CARRY)
        assert jax.tree.structure(fresh) == jax.tree.structure(start)
        for new, first_trace in zip(jax.tree.leaves(fresh.trace), jax.tree.leaves(start.trace)):
            np.testing.assert_array_equal(new, first_trace)
        if isinstance(method, jb.NRES):  # the next window draws a new episode's noise
            assert bool(state.trace.drawn) and not bool(fresh.trace.drawn)


def test_errors():
    with pytest.raises(ValueError, match=r"ES needs sigma > 0 .*got sigma=0.0"):
        jb.ES(0.0)
    with pytest.raises(TypeError, match="PES needs sigma a float"):
        jb.PES("0.1")
    with pytest.raises(ValueError, match=r"NRES needs pairs a positive int .*got pairs=0"):
        jb.NRES(0.1, pairs=0)
    with pytest.raises(ValueError, match=r"PES needs window None .*got window=0"):
        jb.PES(0.1, window=0)
    with pytest.raises(ValueError, match=r"method=jb.NRES\(...\) needs key="):
        jb.online_grad(linear_step, mse, jb.NRES(0.1))(PARAMS, CARRY, XS, TARGETS)
    with pytest.raises(ValueError, match="loss_fn=None needs a final_loss"):
        jb.online_grad(linear_step, None, jb.RTRL())
    with pytest.raises(ValueError, match=r"final_loss\(final_carry\) must return a float scalar"):
        jb.online_grad(linear_step, mse, jb.RTRL(), final_loss=lambda h: h)(PARAMS, CARRY, XS, TARGETS)
    with pytest.raises(TypeError, match="final_loss must be callable"):
        jb.online_grad(linear_step, mse, jb.RTRL(), final_loss=1.0)
    for make in (lambda opt: jb.online(linear_step, mse, opt, jb.RTRL()),
                 lambda opt: jb.online_tbptt(linear_step, mse, opt, truncation=2)):
        with pytest.raises(TypeError, match="needs optimizer an optax.GradientTransformation .*got optimizer=None"):
            make(None)
    with pytest.raises(ValueError, match=r"jb.UORO\(...\) reads the step's structure .*xs=sample"):
        jb.online(linear_step, mse, optax.sgd(0.1), jb.UORO()).init(PARAMS, CARRY, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"jb.TBPTT\(k1, k2\) keeps the last k2 - k1 inputs: pass .*xs=sample"):
        jb.online(linear_step, mse, optax.sgd(0.1), jb.TBPTT(1, 2)).init(PARAMS, CARRY)
    with pytest.raises(ValueError, match=r"window=3\) estimates one window per update; got update_every=2"):
        jb.online(linear_step, mse, optax.sgd(0.1), jb.PES(0.1, window=3), update_every=2)
    # a stream of another batch: an error naming the batch and reset, for both trainers
    trainer = jb.online(linear_step, mse, optax.sgd(0.1), jb.RTRL())
    state = trainer.init(PARAMS, CARRY)
    three = jax.tree.map(lambda a: jnp.concatenate([a, a[:, :1]], axis=1), (XS, TARGETS))
    with pytest.raises(ValueError, match=r"state's carry has shapes \(2, 4\).*reset\(state, carry, xs\)"):
        trainer.update(state, *three)
    state = trainer.reset(state, jnp.zeros((3, H)))  # a stream of three examples from here on
    state, _ = trainer.update(state, *three)
    tbptt = jb.online_tbptt(linear_step, mse, optax.sgd(0.1), truncation=(1, 2))
    state = tbptt.init(PARAMS, CARRY, XS)
    with pytest.raises(ValueError, match=r"history was sized for steps of .*2, 3.*reset\(state, carry, xs\)"):
        tbptt.update(state, *three)
    state, _ = tbptt.update(tbptt.reset(state, jnp.zeros((3, H)), three[0]), *three)
