"""Adapters: other libraries' recurrent cells as jaxbptt Cells.

Every adapter returns a `jaxbptt.Cell` with the built-in cells' convention, whatever the library:

    params = cell.init(key, input_size, dtype=jnp.float32)   # the module's weights, floats cast to dtype
    carry = cell.initial_carry(batch_shape=(), dtype=jnp.float32)
    carry, y = cell.step(params, carry, x)                     # x: (*batch_shape, input_size)

so every jaxbptt option applies (truncation, clipping, diagnostics, memory policies) and
`jaxbptt.with_readout(adapter(...), output_size)`, `jaxbptt.stacked` and the other Cell
combinators accept the result. Libraries that create weights lazily (Flax linen, Haiku) initialise
them in `init` from `key`; modules that hold their weights already (Flax NNX, Equinox, PyTorch)
return those from `init`, and `key` is unused. The steps of Flax, Equinox and Haiku modules take the
engine's generic path; `from_torch` gives the built-in cell with its hand-derived kernel. The peer
libraries are optional: each adapter imports its library when called.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ._cells.rnn import Cell, elman, gru, lstm
from ._types import PyTree


def _cast(tree: PyTree, dtype) -> PyTree:
    """Floating leaves cast to `dtype`; integer and other leaves unchanged."""
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(jnp.result_type(a), jnp.floating) else a, tree)


def _zeros(structs: PyTree, batch_shape, dtype) -> PyTree:
    """Zeros shaped `(*batch_shape, *shape)` for every leaf of one example's carry."""
    return jax.tree.map(lambda s: jnp.zeros(tuple(batch_shape) + tuple(np.shape(s)), dtype), structs)


def _check_input_size(adapter: str, module_size: Optional[int], input_size: int) -> None:
    if module_size is not None and input_size != module_size:
        raise ValueError(f"{adapter}: init got input_size={input_size}, but the module was built for "
                         f"{module_size} input features.")


def _check_type(adapter: str, module, expected: type, what: str) -> None:
    if not isinstance(module, expected):
        raise TypeError(f"{adapter} takes {what}; got {type(module).__name__}.")


def flax_linen(cell) -> Cell:
    """A Flax linen recurrent cell as a `jaxbptt.Cell`.

    Args:
      cell: a linen module called as `cell(carry, x) -> (carry, y)` with an
        `initialize_carry(rng, input_shape)` method: `nn.SimpleCell`, `nn.LSTMCell`, `nn.GRUCell`,
        `nn.OptimizedLSTMCell`, or your own `nn.RNNCellBase`.

    Returns:
      A `Cell`: `init(key, input_size, dtype)` returns the module's variables (`cell.init` on one
      example); `initial_carry(batch_shape, dtype)` the module's `initialize_carry` for that batch
      (an LSTM's is `(c, h)`); `step` is `cell.apply(variables, carry, x)`.

    Raises:
      TypeError: `cell` is not a Flax linen module.

    Examples:
      >>> import pytest; nn = pytest.importorskip("flax.linen")   # skipped where Flax is not installed
      >>> import jax, jax.numpy as jnp, jaxbptt as jb
      >>> model = jb.with_readout(jb.adapters.flax_linen(nn.LSTMCell(16)), 1)
      >>> params = model.init(jax.random.key(0), 3)
      >>> (loss, final), grads = jb.value_and_grad(model.step, lambda y, t: jnp.mean((y - t) ** 2), truncation=5)(
      ...     params, model.initial_carry((4,)), jnp.ones((20, 4, 3), jnp.float32), jnp.zeros((20, 4, 1), jnp.float32))
      >>> grads["W_hy"].shape
      (16, 1)
    """
    from flax import linen

    _check_type("flax_linen", cell, linen.Module, "a Flax linen module (nn.LSTMCell(16), ...)")

    def initial_carry(batch_shape=(), dtype=jnp.float32):
        # linen cells read only the batch dims of input_shape; the feature size is a placeholder.
        return _cast(cell.initialize_carry(jax.random.key(0), tuple(batch_shape) + (1,)), dtype)

    def init(key, input_size: int, dtype=jnp.float32):
        variables = cell.init(key, initial_carry((), dtype), jnp.zeros((input_size,), dtype))
        return _cast(variables, dtype)

    def step(variables, carry, x):
        return cell.apply(variables, carry, x)

    return Cell(init, initial_carry, step)


def flax_nnx(cell) -> Cell:
    """A Flax NNX recurrent cell as a `jaxbptt.Cell`.

    Args:
      cell: an NNX module called as `cell(carry, x) -> (carry, y)` with an
        `initialize_carry(input_shape, rngs)` method: `nnx.SimpleCell`, `nnx.LSTMCell`,
        `nnx.GRUCell`, `nnx.OptimizedLSTMCell`, or your own.

    Returns:
      A `Cell`: `init(key, input_size, dtype)` returns the module's state (`nnx.split(cell)`), its
      floats cast to `dtype` (`key` is unused: the module made its weights when it was built);
      `initial_carry(batch_shape, dtype)` the module's `initialize_carry`; `step` runs
      `nnx.merge(graphdef, state)(carry, x)`.

    Raises:
      TypeError: `cell` is not an NNX module.
      ValueError: from `init`, an `input_size` other than the module's `in_features`.

    Examples:
      >>> import pytest; nnx = pytest.importorskip("flax.nnx")   # skipped where Flax is not installed
      >>> import jax, jax.numpy as jnp, jaxbptt as jb
      >>> model = jb.with_readout(jb.adapters.flax_nnx(nnx.GRUCell(3, 16, rngs=nnx.Rngs(0))), 1)
      >>> params = model.init(jax.random.key(0), 3)
      >>> final, ys = jb.unroll(model.step, params, model.initial_carry((4,)), jnp.ones((20, 4, 3), jnp.float32))
      >>> ys.shape
      (20, 4, 1)
    """
    from flax import nnx

    _check_type("flax_nnx", cell, nnx.Module, "a Flax NNX module (nnx.GRUCell(3, 16, rngs=nnx.Rngs(0)), ...)")
    graphdef, state = nnx.split(cell)
    in_features = getattr(cell, "in_features", None)

    def init(key, input_size: int, dtype=jnp.float32):
        del key
        _check_input_size("flax_nnx", in_features, input_size)
        return _cast(state, dtype)

    def initial_carry(batch_shape=(), dtype=jnp.float32):
        shape = tuple(batch_shape) + (in_features or 1,)
        return _cast(cell.initialize_carry(shape, rngs=nnx.Rngs(0)), dtype)

    def step(state, carry, x):
        return nnx.merge(graphdef, state)(carry, x)

    return Cell(init, initial_carry, step)


def equinox(cell, *, example_carry: Optional[PyTree] = None) -> Cell:
    """An Equinox recurrent cell as a `jaxbptt.Cell`.

    Equinox cells work on one example, `cell(x, state) -> state`; the step maps the cell over the
    carry's batch dims, and its output `y` is the new state, or the state's first entry (`h`) when
    the state is a tuple (an LSTM's `(h, c)`).

    Args:
      cell: an Equinox module called as `cell(x, state) -> state`: `eqx.nn.GRUCell`,
        `eqx.nn.LSTMCell`, or your own.
      example_carry: the state of one example (a pytree of arrays or `jax.ShapeDtypeStruct`s), from
        which `initial_carry` makes zeros with the batch shape in front. Default: `(h, c)` of shape
        `(hidden_size,)` each for `eqx.nn.LSTMCell`, `h` of shape `(hidden_size,)` for any other
        module with a `hidden_size`.

    Returns:
      A `Cell`: `init(key, input_size, dtype)` returns the module's arrays (`eqx.partition(cell,
      eqx.is_array)`), cast to `dtype` (`key` is unused); `initial_carry(batch_shape, dtype)` zeros
      shaped like `example_carry`; `step` as above.

    Raises:
      TypeError: `cell` is not an Equinox module, or it has no `hidden_size` and no
        `example_carry` was given.
      ValueError: from `init`, an `input_size` other than the module's `input_size`.

    Examples:
      >>> import pytest; eqx = pytest.importorskip("equinox")   # skipped where Equinox is not installed
      >>> import jax, jax.numpy as jnp, jaxbptt as jb
      >>> model = jb.with_readout(jb.adapters.equinox(eqx.nn.LSTMCell(3, 16, key=jax.random.key(0))), 1)
      >>> params = model.init(jax.random.key(0), 3)
      >>> final, ys = jb.unroll(model.step, params, model.initial_carry((4,)), jnp.ones((20, 4, 3), jnp.float32))
      >>> ys.shape, final[0].shape
      ((20, 4, 1), (4, 16))
    """
    import equinox as eqx

    _check_type("equinox", cell, eqx.Module, "an Equinox module (eqx.nn.GRUCell(3, 16, key=key), ...)")
    if example_carry is None:
        hidden = getattr(cell, "hidden_size", None)
        if hidden is None:
            raise TypeError(f"equinox: {type(cell).__name__} has no hidden_size, so its state's shape is unknown; "
                            "pass example_carry=, the state of one example (arrays or jax.ShapeDtypeStruct).")
        h = jax.ShapeDtypeStruct((hidden,), jnp.float32)
        example_carry = (h, h) if isinstance(cell, eqx.nn.LSTMCell) else h
    example_ndim = jnp.ndim(jax.tree.leaves(example_carry)[0])
    arrays, static = eqx.partition(cell, eqx.is_array)

    def init(key, input_size: int, dtype=jnp.float32):
        del key
        _check_input_size("equinox", getattr(cell, "input_size", None), input_size)
        return _cast(arrays, dtype)

    def initial_carry(batch_shape=(), dtype=jnp.float32):
        return _zeros(example_carry, batch_shape, dtype)

    def step(arrays, carry, x):
        module = eqx.combine(arrays, static)
        apply = lambda x_, c_: module(x_, c_)
        for _ in range(jnp.ndim(jax.tree.leaves(carry)[0]) - example_ndim):  # the carry's batch dims
            apply = jax.vmap(apply)
        carry = apply(x, carry)
        return carry, (carry[0] if isinstance(carry, tuple) else carry)

    return Cell(init, initial_carry, step)


class _HaikuCore:
    """A Haiku core made by `make_core()` inside `hk.transform`, called `core(x, state) -> (y, state)`."""

    def __init__(self, make_core: Callable):
        import haiku as hk

        self.call = hk.without_apply_rng(hk.transform(lambda x, state: make_core()(x, state)))
        self.state = hk.without_apply_rng(hk.transform(lambda: make_core().initial_state(None)))


def haiku(make_core: Callable) -> Cell:
    """A Haiku RNN core as a `jaxbptt.Cell`.

    Args:
      make_core: a function without arguments that builds the core inside the transform, such as
        `lambda: hk.GRU(64)` (`hk.LSTM`, `hk.VanillaRNN`, `hk.DeepRNN`, ... or your own
        `hk.RNNCore`).

    Returns:
      A `Cell`: `init(key, input_size, dtype)` initialises the transformed core on one example;
      `initial_carry(batch_shape, dtype)` is the core's `initial_state` broadcast over the batch;
      `step(params, carry, x)` calls `core(x, carry) -> (y, carry)` and returns `(carry, y)`, the
      batch dims folded into one for the call (Haiku's cores take one batch axis at most).

    Raises:
      TypeError: `make_core` is not callable.

    Examples:
      >>> import pytest; hk = pytest.importorskip("haiku")   # skipped where Haiku is not installed
      >>> import jax, jax.numpy as jnp, jaxbptt as jb
      >>> model = jb.with_readout(jb.adapters.haiku(lambda: hk.GRU(16)), 1)
      >>> params = model.init(jax.random.key(0), 3)
      >>> final, ys = jb.unroll(model.step, params, model.initial_carry((4,)), jnp.ones((20, 4, 3), jnp.float32))
      >>> ys.shape
      (20, 4, 1)
    """
    if not callable(make_core):
        raise TypeError(f"haiku takes a function that builds the core, such as lambda: hk.GRU(64); got "
                        f"{type(make_core).__name__}.")
    core = _HaikuCore(make_core)

    def initial_carry(batch_shape=(), dtype=jnp.float32):
        state = core.state.apply(core.state.init(None))
        return jax.tree.map(lambda s: jnp.broadcast_to(s.astype(dtype), tuple(batch_shape) + s.shape), state)

    def init(key, input_size: int, dtype=jnp.float32):
        return _cast(core.call.init(key, jnp.zeros((input_size,), dtype), initial_carry((), dtype)), dtype)

    example_ndim = jnp.ndim(jax.tree.leaves(jax.eval_shape(initial_carry))[0])

    def step(params, carry, x):
        # Haiku's cores take one batch axis at most: fold the carry's batch dims into one and back.
        batch = np.shape(jax.tree.leaves(carry)[0])[: jnp.ndim(jax.tree.leaves(carry)[0]) - example_ndim]
        fold = lambda a: a.reshape((-1,) + a.shape[len(batch):]) if len(batch) > 1 else a
        unfold = lambda a: a.reshape(batch + a.shape[1:]) if len(batch) > 1 else a
        y, carry = core.call.apply(params, fold(x), jax.tree.map(fold, carry))
        return jax.tree.map(unfold, carry), jax.tree.map(unfold, y)

    return Cell(init, initial_carry, step)


def from_torch(module) -> Cell:
    """A single-layer, unidirectional `torch.nn.RNN`, `nn.LSTM` or `nn.GRU` as a `jaxbptt.Cell`:
    the built-in cell, with its hand-derived kernel, whose `init` returns the module's weights.

    The layouts match exactly: PyTorch's gate orders (LSTM i, f, g, o; GRU r, z, n, with the
    recurrent bias inside the reset gate's product) are jaxbptt's, so the outputs are PyTorch's.
    The LSTM carry is `jaxbptt.LSTMState(h, c)`; PyTorch's `(h_0, c_0)` map to it directly (without
    their leading layer axis). Inputs are time-major, as PyTorch's default `batch_first=False`.

    Args:
      module: the PyTorch module; its weights are copied once, when this is called.

    Returns:
      A `Cell`: `init(key, input_size, dtype)` returns the module's weights as the built-in cell's
      params, cast to `dtype` (`key` is unused); `initial_carry` and `step` are the built-in cell's.

    Raises:
      TypeError: `module` is not a `torch.nn.RNN`, `LSTM` or `GRU`.
      ValueError: a module with several layers, two directions or an LSTM projection; from `init`,
        an `input_size` other than the module's.

    Examples:
      >>> import pytest; torch = pytest.importorskip("torch")   # skipped where PyTorch is not installed
      >>> import jax, jax.numpy as jnp, jaxbptt as jb
      >>> module = torch.nn.LSTM(3, 16)
      >>> model = jb.with_readout(jb.adapters.from_torch(module), 1)
      >>> params = model.init(jax.random.key(0), 3)
      >>> final, ys = jb.unroll(model.step, params, model.initial_carry((4,)), jnp.ones((20, 4, 3), jnp.float32))
      >>> ys.shape
      (20, 4, 1)
    """
    import torch

    _check_type("from_torch", module, (torch.nn.RNN, torch.nn.LSTM, torch.nn.GRU), "a torch.nn.RNN, LSTM or GRU")
    if module.num_layers != 1 or module.bidirectional:
        raise ValueError(
            f"from_torch converts single-layer, unidirectional modules; got num_layers={module.num_layers}, "
            f"bidirectional={module.bidirectional}. Convert each layer and combine them with jaxbptt.stacked."
        )
    w = {k: np.asarray(v.detach().cpu().numpy()) for k, v in module.state_dict().items()}
    H = module.hidden_size
    bias = lambda name: w.get(f"{name}_l0", np.zeros(w["weight_ih_l0"].shape[0], w["weight_ih_l0"].dtype))
    b_ih, b_hh = bias("bias_ih"), bias("bias_hh")
    if isinstance(module, torch.nn.LSTM):
        if module.proj_size:
            raise ValueError(f"from_torch does not convert LSTMs with projections; got proj_size={module.proj_size}.")
        weights = {"W_x": w["weight_ih_l0"].T, "W_h": w["weight_hh_l0"].T, "b": b_ih + b_hh}
        cell = lstm(H)
    elif isinstance(module, torch.nn.GRU):
        weights = {"W_x": w["weight_ih_l0"].T, "b_x": b_ih, "W_h": w["weight_hh_l0"].T, "b_h": b_hh}
        cell = gru(H)
    else:
        weights = {"W_xh": w["weight_ih_l0"].T, "W_hh": w["weight_hh_l0"].T, "b_h": b_ih + b_hh}
        cell = elman(H, activation=module.nonlinearity)

    def init(key, input_size: int, dtype=jnp.float32):
        del key
        _check_input_size("from_torch", module.input_size, input_size)
        return jax.tree.map(lambda a: jnp.asarray(a, dtype), weights)

    return Cell(init, cell.initial_carry, cell.step)


__all__ = ["equinox", "flax_linen", "flax_nnx", "from_torch", "haiku"]
