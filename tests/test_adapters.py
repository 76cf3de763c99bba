"""Adapters: the peer library's outputs and gradients, through jaxbptt's reverse scan."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbptt as jb
from jaxbptt import adapters
from steps import scan_loss

T, B, D, H = 11, 2, 3, 5


def _data(out=H):
    xs = jax.random.normal(jax.random.key(1), (T, B, D))
    return xs, jax.random.normal(jax.random.key(2), (T, B, out))


def _loss(y, t):
    y = y[0] if isinstance(y, tuple) else y
    return jnp.sum((y - t) ** 2)


def _check(step, params, carry, options=()):
    """jaxbptt's gradients equal jax.grad through lax.scan of the very same step, and the option
    surrogates' gradients under each option set."""
    xs, targets = _data()
    plain = jax.jit(jax.value_and_grad(scan_loss(step, _loss), argnums=(0, 1), has_aux=True))
    (ref, _), ref_g = plain(params, carry, xs, targets)
    for opts in [{}, *options]:
        (loss, _), g = jax.jit(jb.value_and_grad(step, _loss, argnums=(0, 1), **opts))(params, carry, xs, targets)
        if opts:
            ref_opts = {k: v for k, v in opts.items() if k != "remat"}
            (ref, _), ref_g = jax.jit(jb.reference_value_and_grad(step, _loss, argnums=(0, 1), **ref_opts))(
                params, carry, xs, targets)
        chex.assert_trees_all_close(loss, ref, rtol=1e-12)
        chex.assert_trees_all_close(g, ref_g, rtol=1e-10, atol=1e-12)


OPTIONS = (dict(truncation=(2, 5), clip_norm=0.5), dict(remat=3, truncation=4))


# The options act on the adapted step, whatever the cell: each adapter meets them once, on one cell.
@pytest.mark.parametrize("name, options", [("LSTMCell", OPTIONS), ("GRUCell", ()), ("SimpleCell", ())])
def test_flax_linen(name, options):
    nn = pytest.importorskip("flax.linen")
    cell = getattr(nn, name)(H, param_dtype=jnp.float64)
    carry = cell.initialize_carry(jax.random.key(0), (B, D))
    variables = cell.init(jax.random.key(0), carry, jnp.ones((B, D)))
    step = adapters.flax_linen(cell)
    new_carry, y = step(variables, carry, jnp.ones((B, D)))
    chex.assert_trees_all_close((new_carry, y), cell.apply(variables, carry, jnp.ones((B, D))))
    _check(step, variables, carry, options)


def test_flax_nnx():
    nnx = pytest.importorskip("flax.nnx")
    cell = nnx.GRUCell(D, H, rngs=nnx.Rngs(0), param_dtype=jnp.float64)
    step, state = adapters.flax_nnx(cell)
    carry = cell.initialize_carry((B, D), rngs=nnx.Rngs(0)).astype(jnp.float64)
    chex.assert_trees_all_close(step(state, carry, jnp.ones((B, D))), cell(carry, jnp.ones((B, D))))
    _check(step, state, carry, OPTIONS[:1])


@pytest.mark.parametrize("name, options", [("GRUCell", OPTIONS[:1]), ("LSTMCell", ())])
def test_equinox(name, options):
    eqx = pytest.importorskip("equinox")
    cell = getattr(eqx.nn, name)(D, H, key=jax.random.key(0), dtype=jnp.float64)
    step, params = adapters.equinox(cell)
    carry = jnp.zeros((B, H)) if name == "GRUCell" else (jnp.zeros((B, H)), jnp.zeros((B, H)))
    new_carry, _ = step(params, carry, jnp.ones((B, D)))
    expected = jax.vmap(cell)(jnp.ones((B, D)), carry)
    chex.assert_trees_all_close(new_carry, expected, rtol=1e-12)
    _check(step, params, carry, options)


def test_haiku():
    hk = pytest.importorskip("haiku")
    step = adapters.haiku(lambda: hk.GRU(H))
    carry = jnp.zeros((B, H))
    params = jax.tree.map(lambda a: a.astype(jnp.float64), step.init(jax.random.key(0), jnp.ones((B, D)), carry))
    _check(step, params, carry, OPTIONS[:1])


@pytest.mark.parametrize("kind", ["RNN_tanh", "RNN_relu", "LSTM", "GRU"])
def test_torch_weights_give_torch_outputs_and_gradients(kind):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    if kind.startswith("RNN"):
        module = torch.nn.RNN(D, H, nonlinearity=kind.split("_")[1]).double()
    else:
        module = getattr(torch.nn, kind)(D, H).double()
    xs = np.random.default_rng(0).normal(size=(T, B, D))
    h0 = np.random.default_rng(1).normal(size=(B, H)) * 0.1
    x_t = torch.tensor(xs, requires_grad=False)
    state = (torch.tensor(h0[None]), torch.tensor(h0[None])) if kind == "LSTM" else torch.tensor(h0[None])
    ys_torch, _ = module(x_t, state)
    (ys_torch ** 2).sum().backward()

    cell, params = jb.adapters.from_torch(module)
    carry = jb.LSTMState(jnp.asarray(h0), jnp.asarray(h0)) if kind == "LSTM" else jnp.asarray(h0)
    _, ys = jb.unroll(cell.step, params, carry, jnp.asarray(xs))
    np.testing.assert_allclose(ys, ys_torch.detach().numpy(), rtol=1e-5, atol=1e-5)

    grads = jax.grad(lambda p: jnp.sum(jb.unroll(cell.step, p, carry, jnp.asarray(xs))[1] ** 2))(params)
    w_hh = grads["W_hh"] if kind.startswith("RNN") else grads["W_h"]
    np.testing.assert_allclose(w_hh.T, module.weight_hh_l0.grad.numpy(), rtol=1e-5, atol=1e-8)


def test_torch_rejects_what_it_cannot_convert():
    torch = pytest.importorskip("torch")
    with pytest.raises(ValueError, match="single-layer, unidirectional modules; got num_layers=2"):
        adapters.from_torch(torch.nn.GRU(3, 4, num_layers=2))
    with pytest.raises(TypeError, match="converts torch.nn.RNN, LSTM or GRU; got Linear"):
        adapters.from_torch(torch.nn.Linear(3, 4))
