"""The generic path's split of a step at its parameter uses: exact for every kind of step (rows
mixed by the step or by its custom derivative rules, nested jit, parameters transformed before use,
outputs that do not vary), against jax.grad through lax.scan in float64."""

import jax
import jax.numpy as jnp
import pytest
from jax import lax
from jax.test_util import check_grads

import jaxbptt as jb
from jaxbptt._engine.split import split_step
from steps import scan_loss, two_layer_init, two_layer_step


@jax.custom_vjp
def _batch_scaled_identity(z):
    return z


_batch_scaled_identity.defvjp(lambda z: (z, z.shape[0]), lambda n, g: (g / n,))  # backward mixes the batch


@jax.custom_jvp
def _batch_centred_identity(z):
    return z


@_batch_centred_identity.defjvp
def _batch_centred_jvp(primals, tangents):
    return primals[0], tangents[0] - jnp.mean(tangents[0], axis=0, keepdims=True)


@jax.custom_vjp
def _scaled_matmul(h, w):  # a custom rule that reads a parameter: the whole call is one site
    return h @ w


_scaled_matmul.defvjp(lambda h, w: (h @ w, (h, w)), lambda r, g: (g @ r[1].T / g.shape[0], r[0].T @ g))


@jax.jit
def _jitted_layer(w, h):
    return jnp.tanh(h @ w)


def _elman_with(rule):
    def step(p, h, x):
        return (jnp.tanh(rule(x @ p["W"] + h @ p["U"])),) * 2

    return step


STEPS = {
    "batch-normalised": lambda p, h, x: (jnp.tanh(x @ p["W"] + (h - jnp.mean(h, axis=0, keepdims=True)) @ p["U"]),) * 2,
    "rows-coupled": lambda p, h, x: (jnp.tanh(x @ p["W"] + jnp.sum(h, axis=0, keepdims=True) @ p["U"]),) * 2,
    "custom_vjp-mixes-rows": _elman_with(_batch_scaled_identity),
    "custom_jvp-mixes-rows": _elman_with(_batch_centred_identity),
    "custom_vjp-reads-params": lambda p, h, x: (jnp.tanh(x @ p["W"] + _scaled_matmul(h, p["U"])),) * 2,
    "nested-jit": lambda p, h, x: (_jitted_layer(p["U"], h) + x @ p["W"],) * 2,
    "transformed-params": lambda p, h, x: (jnp.tanh(x @ p["W"] + h @ (jnp.exp(p["U"]) - 1.0).T),) * 2,
    "elementwise-params": lambda p, h, x: (jnp.tanh(p["U"][:1] * h + x @ p["W"]) * p["U"][1:2],) * 2,
    "constant-output": lambda p, h, x: (jnp.tanh(x @ p["W"] + h @ p["U"]), jnp.sum(p["U"]) * jnp.ones_like(h)),
    "readout-of-carry": lambda p, h, x: ((h2 := jnp.tanh(x @ p["W"] + h @ p["U"])), jnp.sin(h2 @ p["U"]) * h2),
    "output-reads-input": lambda p, h, x: ((h2 := jnp.tanh(x @ p["W"] + h @ p["U"])), h2 @ p["U"] + x @ p["W"]),
    "inner-scan": lambda p, h, x: (lax.scan(lambda c, _: (jnp.tanh(c @ p["U"] + x @ p["W"]), None), h, None,
                                            length=2)[0],) * 2,
}
PARAMS = {"W": 0.5 * jax.random.normal(jax.random.key(0), (3, 4)),
          "U": 0.4 * jax.random.normal(jax.random.key(1), (4, 4))}


def _sse(y, t):
    return jnp.sum((y - t) ** 2)


@pytest.mark.parametrize("name", STEPS)
def test_every_step_matches_autodiff(name):
    step = STEPS[name]
    args = (PARAMS, 0.3 * jnp.ones((2, 4)), jax.random.normal(jax.random.key(2), (9, 2, 3)), jnp.zeros((9, 2, 4)))
    (loss, _), ref = jax.value_and_grad(scan_loss(step, _sse), argnums=(0, 1, 2), has_aux=True)(*args)
    (value, _), g = jb.value_and_grad(step, _sse, argnums=(0, 1, 2), engine="reverse", remat=4)(*args)
    assert jnp.allclose(value, loss, rtol=1e-12)
    assert jax.tree.all(jax.tree.map(lambda a, b: jnp.allclose(a, b, rtol=1e-10, atol=1e-12), g, ref))


def test_sites_are_the_parameter_uses():
    """The two-layer step splits at its four parameter uses inside the loop (two products, two bias
    adds), not into one opaque site, each product under a bias add sharing the add's cotangent; its
    readout depends on the new carry alone. A step whose output does not vary is one opaque site."""
    p = two_layer_init(jax.random.key(0), 3, 4)
    carry = {"h1": jnp.zeros((2, 4)), "h2": jnp.zeros((2, 4))}
    split = split_step(two_layer_step, p, carry, jnp.zeros((2, 3)))
    assert split.output_from_carry  # the readout h2 @ Wy is computed per block, outside the loop
    assert [(s.eqn.primitive.name, s.same_cotangent_as) for s in split.sites] == [
        ("dot_general", 1), ("add", None), ("dot_general", 3), ("add", None)]  # h @ W under + b
    split = split_step(STEPS["constant-output"], PARAMS, jnp.zeros((2, 4)), jnp.zeros((2, 3)))
    assert len(split.sites) == 1 and len(split.sites[0].eqn.outvars) == 2


def test_check_grads_and_vmap():
    h0, xs = 0.3 * jnp.ones((2, 4)), jax.random.normal(jax.random.key(3), (5, 2, 3))
    check_grads(lambda p, h, x: jnp.sum(jb.unroll(STEPS["batch-normalised"], p, h, x)[1] ** 2), (PARAMS, h0, xs),
                order=1, modes=["rev"])
    step = STEPS["custom_vjp-reads-params"]  # its rule is not the primal's derivative: compared with autodiff
    loss = lambda p, h, x: jnp.sum(jb.unroll(step, p, h, x)[1] ** 2)
    scales = jnp.asarray([0.5, 1.0, 2.0])
    swept = jax.vmap(lambda s: jax.grad(loss)(jax.tree.map(lambda a: s * a, PARAMS), h0, xs))(scales)
    for i, s in enumerate(scales):
        one = jax.grad(scan_loss(step, lambda y, t: jnp.sum(y**2)), has_aux=True)(
            jax.tree.map(lambda a: s * a, PARAMS), h0, xs, jnp.zeros((5, 2, 4)))[0]
        assert jax.tree.all(jax.tree.map(lambda a, b: jnp.allclose(a[i], b, rtol=1e-10), swept, one))


def test_float32():
    step = STEPS["elementwise-params"]
    args = jax.tree.map(lambda a: a.astype(jnp.float32), (PARAMS, 0.3 * jnp.ones((2, 4)),
                        jax.random.normal(jax.random.key(4), (9, 2, 3)), jnp.zeros((9, 2, 4))))
    _, ref = jax.value_and_grad(scan_loss(step, _sse), has_aux=True)(*args)
    _, g = jb.value_and_grad(step, _sse, engine="reverse")(*args)
    assert jax.tree.all(jax.tree.map(lambda a, b: a.dtype == jnp.float32 and jnp.allclose(a, b, rtol=1e-4), g, ref))
