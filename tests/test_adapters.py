"""Adapters: other libraries' cells as jaxbptt Cells, with one convention for every library.

Each adapter's Cell gives the library's own outputs, and `jb.with_readout` of it gives jaxbptt
gradients equal to jax.grad through lax.scan of the very same model (and to the option surrogates'
under each option set)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbptt as jb
from jaxbptt import adapters
from steps import scan_loss

T, B, D, H, O = 11, 2, 3, 5, 2
F64 = jnp.float64


def _data():
    xs = jax.random.normal(jax.random.key(1), (T, B, D))
    return xs, jax.random.normal(jax.random.key(2), (T, B, O))


def _loss(y, t):
    return jnp.sum((y - t) ** 2)


def _check_cell(cell, options=None):
    """The Cell convention (init's dtype, initial_carry's batch shape and dtype), then jaxbptt's
    gradients of `with_readout(cell, O)` against jax.grad through lax.scan of the same model, and
    against the option surrogates under each option set. `options=None`: the convention only."""
    params = cell.init(jax.random.key(0), D, F64)
    assert all(a.dtype == F64 for a in jax.tree.leaves(params) if jnp.issubdtype(a.dtype, jnp.floating))
    carry = cell.initial_carry((4, B), jnp.float32)
    assert all(a.shape[:2] == (4, B) and a.dtype == jnp.float32 for a in jax.tree.leaves(carry))
    new_carry, _ = cell.step(params, cell.initial_carry((4, B), F64), jnp.ones((4, B, D)))
    chex.assert_trees_all_equal_shapes_and_dtypes(new_carry, cell.initial_carry((4, B), F64))
    if options is None:
        return
    model = jb.with_readout(cell, O)
    params, carry = model.init(jax.random.key(0), D, F64), model.initial_carry((B,), F64)
    xs, targets = _data()
    plain = jax.jit(jax.value_and_grad(scan_loss(model.step, _loss), argnums=(0, 1), has_aux=True))
    (ref, _), ref_g = plain(params, carry, xs, targets)
    for opts in [{}, *options]:
        (loss, _), g = jax.jit(jb.value_and_grad(model.step, _loss, argnums=(0, 1), **opts))(params, carry, xs, targets)
        if opts:
            ref_opts = {k: v for k, v in opts.items() if k != "remat"}
            (ref, _), ref_g = jax.jit(jb.reference_value_and_grad(model.step, _loss, argnums=(0, 1), **ref_opts))(
                params, carry, xs, targets)
        chex.assert_trees_all_close(loss, ref, rtol=1e-12)
        chex.assert_trees_all_close(g, ref_g, rtol=1e-10, atol=1e-12)


OPTIONS = (dict(truncation=(2, 5), clip_norm=0.5), dict(remat=3, truncation=4))


# The options act on the adapted step, whatever the cell: each adapter meets them once, on one cell.
@pytest.mark.parametrize("name, options", [("LSTMCell", OPTIONS), ("GRUCell", None), ("SimpleCell", ())])
def test_flax_linen(name, options):
    nn = pytest.importorskip("flax.linen")
    module = getattr(nn, name)(H)
    cell = adapters.flax_linen(module)
    variables = cell.init(jax.random.key(0), D, F64)
    carry, x = cell.initial_carry((B,), F64), jnp.ones((B, D))
    chex.assert_trees_all_close(cell.step(variables, carry, x), module.apply(variables, carry, x))
    _check_cell(cell, options)


def test_flax_nnx():
    nnx = pytest.importorskip("flax.nnx")
    module = nnx.GRUCell(D, H, rngs=nnx.Rngs(0), param_dtype=F64)
    cell = adapters.flax_nnx(module)
    state, carry, x = cell.init(jax.random.key(0), D, F64), cell.initial_carry((B,), F64), jnp.ones((B, D))
    chex.assert_trees_all_close(cell.step(state, carry, x), module(carry, x))
    _check_cell(cell, OPTIONS[:1])
    with pytest.raises(ValueError, match="flax_nnx: init got input_size=4, but the module was built for 3 input"):
        cell.init(jax.random.key(0), 4)


@pytest.mark.parametrize("name, options", [("GRUCell", OPTIONS[:1]), ("LSTMCell", ())])
def test_equinox(name, options):
    eqx = pytest.importorskip("equinox")
    module = getattr(eqx.nn, name)(D, H, key=jax.random.key(0), dtype=F64)
    cell = adapters.equinox(module)
    params, carry = cell.init(jax.random.key(0), D, F64), cell.initial_carry((B,), F64)
    new_carry, y = cell.step(params, carry, jnp.ones((B, D)))
    chex.assert_trees_all_close(new_carry, jax.vmap(module)(jnp.ones((B, D)), carry), rtol=1e-12)
    chex.assert_trees_all_close(y, new_carry[0] if name == "LSTMCell" else new_carry)
    _check_cell(cell, options)


def test_equinox_module_of_your_own():
    """A module without `hidden_size` gets its state's shape from `example_carry`; without it, an error."""
    eqx = pytest.importorskip("equinox")

    class Leaky(eqx.Module):
        w: jax.Array

        def __call__(self, x, state):
            h, c = state
            return jnp.tanh(self.w.T @ x + h), c + 1.0  # one example: w.T @ x needs x of shape (D,)

    module = Leaky(jax.random.normal(jax.random.key(0), (D, H)))
    with pytest.raises(TypeError, match="equinox: Leaky has no hidden_size, so its state's shape is unknown; pass "
                                        "example_carry="):
        adapters.equinox(module)
    cell = adapters.equinox(module, example_carry=(jnp.zeros(H), jnp.zeros(())))
    _check_cell(cell)
    carry, y = cell.step(cell.init(None, D), cell.initial_carry((B,)), jnp.ones((B, D)))
    np.testing.assert_allclose(carry[1], np.ones(B))
    np.testing.assert_allclose(y, carry[0])


def test_haiku():
    hk = pytest.importorskip("haiku")
    cell = adapters.haiku(lambda: hk.GRU(H))
    core = hk.without_apply_rng(hk.transform(lambda x, s: hk.GRU(H)(x, s)))
    params, carry, x = cell.init(jax.random.key(0), D, F64), cell.initial_carry((B,), F64), jnp.ones((B, D))
    y, new_carry = core.apply(params, x, carry)
    chex.assert_trees_all_close(cell.step(params, carry, x), (new_carry, y))
    _check_cell(cell, OPTIONS[:1])


def test_adapters_refuse_what_they_cannot_adapt():
    pytest.importorskip("flax")
    pytest.importorskip("equinox")
    with pytest.raises(TypeError, match=r"flax_linen takes a Flax linen module \(nn.LSTMCell\(16\), ...\); got int"):
        adapters.flax_linen(3)
    with pytest.raises(TypeError, match=r"flax_nnx takes a Flax NNX module .*; got function"):
        adapters.flax_nnx(lambda: None)
    with pytest.raises(TypeError, match=r"equinox takes an Equinox module .*; got str"):
        adapters.equinox("GRUCell")
    with pytest.raises(TypeError, match=r"haiku takes a function that builds the core, .*; got int"):
        adapters.haiku(64)


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
    state = (torch.tensor(h0[None]), torch.tensor(h0[None])) if kind == "LSTM" else torch.tensor(h0[None])
    ys_torch, _ = module(torch.tensor(xs), state)
    (ys_torch ** 2).sum().backward()

    cell = jb.adapters.from_torch(module)
    params = cell.init(None, D, F64)
    carry = jb.LSTMState(jnp.asarray(h0), jnp.asarray(h0)) if kind == "LSTM" else jnp.asarray(h0)
    _, ys = jb.unroll(cell.step, params, carry, jnp.asarray(xs))
    np.testing.assert_allclose(ys, ys_torch.detach().numpy(), rtol=1e-5, atol=1e-5)

    grads = jax.grad(lambda p: jnp.sum(jb.unroll(cell.step, p, carry, jnp.asarray(xs))[1] ** 2))(params)
    w_hh = grads["W_hh"] if kind.startswith("RNN") else grads["W_h"]
    np.testing.assert_allclose(w_hh.T, module.weight_hh_l0.grad.numpy(), rtol=1e-5, atol=1e-8)
    if kind == "GRU":
        _check_cell(cell, ())


def test_torch_rejects_what_it_cannot_convert():
    torch = pytest.importorskip("torch")
    with pytest.raises(ValueError, match="single-layer, unidirectional modules; got num_layers=2"):
        adapters.from_torch(torch.nn.GRU(3, 4, num_layers=2))
    with pytest.raises(TypeError, match="from_torch takes a torch.nn.RNN, LSTM or GRU; got Linear"):
        adapters.from_torch(torch.nn.Linear(3, 4))
    with pytest.raises(ValueError, match="from_torch: init got input_size=5, but the module was built for 3 input"):
        adapters.from_torch(torch.nn.GRU(3, 4)).init(None, 5)
