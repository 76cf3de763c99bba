"""The row-wise proof behind folding time into the batch axis: it must accept ordinary steps and
reject every step for which folding would change the result."""

import jax
import jax.numpy as jnp
import pytest

import jaxbptt as jb
from jaxbptt._fold import is_rowwise
from steps import scan_loss, two_layer_init, two_layer_step, tuple_init, tuple_step

S = jax.ShapeDtypeStruct


def _specs(carry_shapes, x_shape, rows=2, fold=5):
    """Abstract (carry, x) with `rows` rows, and the same with `rows * fold` rows."""
    is_shape = lambda s: isinstance(s, tuple) and all(isinstance(d, int) for d in s)

    def specs(n):
        carry = jax.tree.map(lambda s: S((n,) + s, jnp.float32), carry_shapes, is_leaf=is_shape)
        return carry, S((n,) + x_shape, jnp.float32)

    return specs(rows) + specs(rows * fold)


def _bias_free_elman(p, h, x):
    h = jnp.tanh(x @ p["W"] + h @ p["U"])
    return h, h


ELMAN_PARAMS = {"W": jnp.ones((3, 4)), "U": jnp.ones((4, 4))}


def test_accepts_ordinary_steps():
    cell = jb.lstm(4)
    assert is_rowwise(cell.step, cell.init(jax.random.key(0), 3), *_specs(jb.LSTMState((4,), (4,)), (3,)))
    assert is_rowwise(two_layer_step, two_layer_init(jax.random.key(0), 3, 4), *_specs({"h1": (4,), "h2": (4,)}, (3,)))
    assert is_rowwise(tuple_step, tuple_init(jax.random.key(0), 3, 4), *_specs(((4,), (4,)), (3,)))
    relu_softplus = lambda p, h, x: (jax.nn.relu(x @ p["W"]) + jax.nn.softplus(h @ p["U"]),) * 2
    assert is_rowwise(relu_softplus, ELMAN_PARAMS, *_specs((4,), (3,)))


@pytest.mark.parametrize("step", [
    lambda p, h, x: ((h - jnp.mean(h, axis=0)) @ p["U"],) * 2,                  # normalises over the batch
    lambda p, h, x: (h + jnp.sum(h, axis=0, keepdims=True) @ p["U"],) * 2,      # couples the rows
    lambda p, h, x: (h * jnp.arange(h.shape[0])[:, None],) * 2,                 # depends on the row index
    lambda p, h, x: (h * 2.0 if h.shape[0] > 4 else h,) * 2,                    # branches on the batch size
    lambda p, h, x: (jnp.roll(h, 1, axis=0),) * 2,                              # moves rows
    lambda p, h, x: (h, jnp.sum(h)),                                            # output without rows
    lambda p, h, x: (jnp.sort(h, axis=0),) * 2,                                 # unknown primitive on rows
])
def test_rejects_steps_that_mix_rows(step):
    assert not is_rowwise(step, ELMAN_PARAMS, *_specs((4,), (3,)))


def test_rejected_steps_still_get_exact_gradients():
    """A batch-coupled step takes the vmap path; its gradient still matches autodiff."""

    def coupled(p, h, x):
        h = jnp.tanh(x @ p["W"] + (h - jnp.mean(h, axis=0, keepdims=True)) @ p["U"])
        return h, h

    params = {"W": 0.5 * jax.random.normal(jax.random.key(0), (3, 4)), "U": 0.4 * jnp.eye(4)}
    args = (params, jnp.ones((2, 4)), jax.random.normal(jax.random.key(1), (30, 2, 3)), jnp.zeros((30, 2, 4)))
    loss = lambda y, t: jnp.sum((y - t) ** 2)
    _, g = jax.jit(jb.value_and_grad(coupled, loss))(*args)
    _, ref = jax.value_and_grad(scan_loss(coupled, loss), has_aux=True)(*args)
    assert jax.tree.all(jax.tree.map(lambda a, b: jnp.allclose(a, b, rtol=1e-10), g, ref))


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


@jax.custom_jvp
def _rowwise_softsign(z):
    return z / (1 + jnp.abs(z))


@_rowwise_softsign.defjvp
def _rowwise_softsign_jvp(primals, tangents):
    (z,), (dz,) = primals, tangents
    return _rowwise_softsign(z), dz / (1 + jnp.abs(z)) ** 2


def _elman_with(rule):
    def step(p, h, x):
        h = jnp.tanh(rule(x @ p["W"] + h @ p["U"]))
        return h, h

    return step


ROW_MIXING_RULES = {"custom_vjp": _batch_scaled_identity, "custom_jvp": _batch_centred_identity}


@pytest.mark.parametrize("rule", ROW_MIXING_RULES.values(), ids=ROW_MIXING_RULES.keys())
def test_custom_rules_that_mix_rows_are_not_folded(rule):
    """The primal of each rule is row-wise (an identity), its derivative is not: no folding, and
    the gradients of every entry point equal autodiff through lax.scan."""
    step = _elman_with(rule)
    assert is_rowwise(_elman_with(lambda z: z), ELMAN_PARAMS, *_specs((4,), (3,)))
    assert not is_rowwise(step, ELMAN_PARAMS, *_specs((4,), (3,)))
    params = {"W": 0.5 * jax.random.normal(jax.random.key(0), (3, 4)), "U": 0.4 * jax.random.normal(jax.random.key(1), (4, 4))}
    args = (params, jnp.ones((2, 4)), jax.random.normal(jax.random.key(2), (10, 2, 3)), jnp.zeros((10, 2, 4)))
    loss = lambda y, t: jnp.sum((y - t) ** 2)
    _, ref = jax.value_and_grad(scan_loss(step, loss), has_aux=True)(*args)
    _, g = jax.jit(jb.value_and_grad(step, loss))(*args)
    chex_close = lambda a, b: jax.tree.all(jax.tree.map(lambda x, y: jnp.allclose(x, y, rtol=1e-10, atol=1e-12), a, b))
    assert chex_close(g, ref)
    unrolled = lambda p: jnp.sum((jb.unroll(step, p, args[1], args[2], remat=5)[1] - args[3]) ** 2)
    assert chex_close(jax.grad(unrolled)(params), ref)


def test_custom_jvp_rule_that_is_rowwise_is_folded():
    assert is_rowwise(_elman_with(_rowwise_softsign), ELMAN_PARAMS, *_specs((4,), (3,)))
