"""Steps that close over traced values differentiate like `lax.scan` with respect to those values."""

import chex
import jax
import jax.numpy as jnp
import pytest
from jax import lax

import jaxbptt as jb
import jaxbptt._engine.kernel
from steps import mse, problem, scan_loss


def _scaled(step, scale):
    """`step` with its carry multiplied by a closed-over `scale` (a hyperparameter)."""
    return lambda p, c, x: step(p, jax.tree.map(lambda a: a * scale, c), x)

def test_grad_with_respect_to_a_closed_over_value():
    step, _, params, carry, xs, _ = problem("two_layer", T=8, B=2, H=3)
    objective = lambda final, ys: sum(jnp.sum(jnp.sin(a)) for a in jax.tree.leaves((final, ys)))

    def loss(scale, p, unroll):
        return objective(*unroll(_scaled(step, scale), p, carry, xs))

    scan = lambda s, p, c, x: lax.scan(lambda c_, x_: s(p, c_, x_), c, x)
    ref = jax.grad(loss, argnums=(0, 1))(jnp.asarray(0.8), params, scan)
    run = lambda s, p, c, x: jb.unroll(s, p, c, x, remat=4)
    chex.assert_trees_all_close(jax.grad(loss, argnums=(0, 1))(jnp.asarray(0.8), params, run), ref, rtol=1e-10)
    grad_of_jit = jax.grad(jax.jit(loss, static_argnums=2), argnums=(0, 1))
    chex.assert_trees_all_close(grad_of_jit(jnp.asarray(0.8), params, jb.unroll), ref, rtol=1e-10)
    jax.test_util.check_grads(lambda s: loss(s, params, jb.unroll), (jnp.asarray(0.8),), order=1, modes=["rev"])

def test_meta_gradient_through_value_and_grad():
    """The gradient of (loss + |grads|^2) with respect to a closed-over value: second order."""
    step, loss_fn, params, carry, xs, targets = problem("elman", T=6, B=2, H=3)

    def meta(scale, value_and_grad):
        (value, _), grads = value_and_grad(_scaled(step, scale))(params, carry, xs, targets)
        return value + sum(jnp.sum(g ** 2) for g in jax.tree.leaves(grads))

    ref = jax.grad(meta)(jnp.asarray(0.9), lambda s: jax.value_and_grad(scan_loss(s, loss_fn), has_aux=True))
    got = jax.grad(meta)(jnp.asarray(0.9), lambda s: jb.value_and_grad(s, loss_fn))
    assert jnp.allclose(got, ref, rtol=1e-10)


# ---- kernel-backed steps that declare their closure (`Step.closure`): resettable's initial carry ----


def _objective(final, ys):
    return sum(jnp.sum(jnp.sin(a)) for a in jax.tree.leaves((final, ys)))


def _reset_case(name, T=8, B=3, H=4):
    """`(make_step, params, carry, inputs, init)`: `make_step(init)` builds the combinator under test
    around `jb.resettable(step, init)`, `step` a bare LSTM's, else an Elman cell's with a readout
    (both kernel-backed; the Elman cell keeps the compiled programs small)."""
    step, _, params, carry, xs, _ = problem("lstm" if name == "resettable" else "elman", T=T, B=B, H=H)
    resets = jnp.zeros((T, B), bool).at[2, 0].set(True).at[4, 1].set(True).at[4, 2].set(True).at[6, 0].set(True)
    init = jax.tree.map(lambda a: 0.3 + 0.2 * jax.random.normal(jax.random.key(3), a.shape[1:], a.dtype), carry)
    inputs = (xs, resets)
    if name == "resettable":  # the bare built-in cell's step
        return lambda i: jb.resettable(jb.lstm(H).step, i), params["cell"], carry, inputs, init
    if name == "elman":
        return lambda i: jb.resettable(step, i), params, carry, inputs, init
    if name == "masked":
        mask = jb.lengths_to_mask(jnp.asarray([T, 5, 3]), T)
        return lambda i: jb.masked(jb.resettable(step, i)), params, carry, (inputs, mask), init
    if name == "nested":  # two resets of the same initial carry: two declared closures
        again = jnp.zeros((T, B), bool).at[5, 2].set(True).at[3, 0].set(True)
        return lambda i: jb.resettable(jb.resettable(step, i), i), params, carry, (inputs, again), init
    if name == "stacked":
        gru = jb.gru(H)
        p2 = gru.init(jax.random.key(4), 3, jnp.float64)  # the readout's 3 outputs
        stack = lambda i: jb.stacked(jb.resettable(step, i), gru.step)
        return stack, (params, p2), (carry, jnp.full((B, H), 0.1)), inputs, init
    raise ValueError(name)


def _scan(step, params, carry, xs):
    return lax.scan(lambda c, x: step(params, c, x), carry, xs)


@pytest.mark.parametrize("name", ["resettable", "nested", "stacked"])  # masked: in bidirectional below
def test_grad_of_jit_with_respect_to_a_declared_closure(name, monkeypatch):
    """`jax.grad(jax.jit(f))` with respect to `resettable`'s initial carry and the params: equal to
    `lax.scan`'s, through the combinator's own kernel (the generic kernel is never built); under vmap
    over initial carries for the nested case."""
    make, params, carry, inputs, init = _reset_case(name)
    loss = lambda i, p, run: _objective(*run(make(i), p, carry, inputs))
    grad = lambda run: jax.grad(lambda i, p: loss(i, p, run), argnums=(0, 1))

    monkeypatch.setattr(jaxbptt._engine.kernel, "generic_kernel", lambda *a: pytest.fail("the generic kernel was built"))
    if name == "nested":
        inits = jax.tree.map(lambda a: jnp.stack([a, 2 * a]), init)
        ref = jax.jit(jax.vmap(grad(_scan), in_axes=(0, None)))(inits, params)
        got = jax.vmap(jax.grad(jax.jit(loss, static_argnums=2), argnums=(0, 1)), in_axes=(0, None, None))(
            inits, params, jb.unroll)
    else:
        ref = jax.jit(grad(_scan))(init, params)
        got = jax.grad(jax.jit(loss, static_argnums=2), argnums=(0, 1))(init, params, jb.unroll)
    assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(ref[0]))
    chex.assert_trees_all_close(got, ref, rtol=1e-10)


def test_declared_closure_with_every_gradient_option():
    """The initial carry's gradient under truncation, clipping and a memory policy, against `jax.grad` of
    the surrogate `lax.scan`; on the exact path, `check_grads` and the gradient without jit."""
    make, params, carry, inputs, init = _reset_case("elman")
    options = dict(truncation=3, clip_norm=0.3)
    loss = lambda i, run, **more: _objective(*run(make(i), params, carry, inputs, **options, **more))
    ref = jax.jit(jax.grad(loss), static_argnums=1)(init, jb.reference_unroll)
    got = jax.jit(jax.grad(lambda i: loss(i, jb.unroll, remat=3)))(init)
    chex.assert_trees_all_close(got, ref, rtol=1e-10)
    exact = lambda i, run=jb.unroll: _objective(*run(make(i), params, carry, inputs))
    jax.test_util.check_grads(jax.jit(exact), (init,), order=1, modes=["rev"])
    ref = jax.jit(jax.grad(exact), static_argnums=1)(init, _scan)
    chex.assert_trees_all_close(jax.grad(exact)(init), ref, rtol=1e-10)  # without jit


def test_closures_through_value_and_grad_and_the_other_combinators(monkeypatch):
    """`value_and_grad` of a step closing over a traced initial carry (its loss differentiated with
    respect to it, and its parameter gradients under jit); `with_readout` over a Cell whose step
    declares a closure (it keeps the kernels) and `bidirectional` of masked resettable steps,
    both under `jax.grad(jax.jit)`."""
    make, params, carry, inputs, init = _reset_case("elman")
    targets = jax.random.normal(jax.random.key(8), (8, 3, 3))

    def loss_and_grads(i, value_and_grad):  # (loss, its gradients with respect to params), differentiated in i
        (value, _), grads = value_and_grad(make(i))(params, carry, inputs, targets)
        return value, grads

    ours = lambda s: jb.value_and_grad(s, mse)
    oracle = lambda s: jax.value_and_grad(scan_loss(s, mse), has_aux=True)
    got = jax.jit(jax.grad(loss_and_grads, has_aux=True), static_argnums=1)(init, ours)
    chex.assert_trees_all_close(got, jax.jit(jax.grad(loss_and_grads, has_aux=True), static_argnums=1)(init, oracle),
                                rtol=1e-10)

    elman = jb.elman(4)
    model = lambda i: jb.with_readout(jb.Cell(elman.init, elman.initial_carry, jb.resettable(elman.step, i)), 3)
    make, params, carry, inputs, init = _reset_case("masked")  # an Elman cell's problem
    loss = lambda i, run: _objective(*run(model(i).step, params, carry, inputs[0]))
    ref = jax.jit(jax.grad(loss), static_argnums=1)(init, _scan)
    with monkeypatch.context() as patch:
        patch.setattr(jaxbptt._engine.kernel, "generic_kernel", lambda *a: pytest.fail("the generic kernel was built"))
        chex.assert_trees_all_close(jax.grad(jax.jit(loss, static_argnums=1))(init, jb.unroll), ref, rtol=1e-10)

    def both(i, unroll):
        step = make(i)
        return _objective(*jb.bidirectional(step, step, (params, params), (carry, carry), inputs, unroll=unroll))

    flip = lambda tree: jax.tree.map(lambda a: jnp.flip(a, 0), tree)

    def both_ref(i):
        step = make(i)
        (f1, y1), (f2, y2) = _scan(step, params, carry, inputs), _scan(step, params, carry, flip(inputs))
        return _objective((f1, f2), jnp.concatenate([y1, flip(y2)], axis=-1))

    chex.assert_trees_all_close(jax.grad(jax.jit(both, static_argnums=1))(init, 1), jax.jit(jax.grad(both_ref))(init),
                                rtol=1e-10)
