"""Adapters: cells of other libraries as jaxbptt steps, and PyTorch RNN weights as jaxbptt params.

Each adapter returns a plain `step(params, carry, x) -> (carry, y)`, so every jaxbptt option
(truncation, clipping, diagnostics, memory policies) applies; such steps take the generic path.
The peer libraries are optional: each adapter imports its library when called.

    step = adapters.flax_linen(nn.LSTMCell(64))                 # params: the module's variables
    step, params = adapters.flax_nnx(nnx.GRUCell(3, 64, rngs=nnx.Rngs(0)))
    step, params = adapters.equinox(eqx.nn.GRUCell(3, 64, key=key))
    step = adapters.haiku(lambda: hk.GRU(64))                   # params: from step.init
    cell, params = adapters.from_torch(torch.nn.LSTM(3, 64))    # a built-in jaxbptt cell
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ._cells.rnn import Cell, elman, gru, lstm
from ._types import PyTree, StepFn


def flax_linen(cell) -> StepFn:
    """A Flax linen recurrent cell (`nn.SimpleCell`, `nn.LSTMCell`, `nn.GRUCell`, or any module
    called as `cell(carry, x) -> (carry, y)`) as a step whose params are the module's variables
    (`cell.init(key, carry, x)`) and whose carry is the module's (`cell.initialize_carry`)."""

    def step(variables, carry, x):
        return cell.apply(variables, carry, x)

    return step


def flax_nnx(cell) -> tuple[StepFn, PyTree]:
    """A Flax NNX recurrent cell, called as `cell(carry, x) -> (carry, y)`, as `(step, state)`:
    the step runs `nnx.merge(graphdef, state)(carry, x)`; `state` (all of the cell's variables) is
    the params pytree."""
    from flax import nnx

    graphdef, state = nnx.split(cell)

    def step(state, carry, x):
        return nnx.merge(graphdef, state)(carry, x)

    return step, state


def equinox(cell) -> tuple[StepFn, PyTree]:
    """An Equinox cell (`eqx.nn.GRUCell`, `eqx.nn.LSTMCell`, or any module called as
    `cell(x, state) -> state` on unbatched arrays) as `(step, params)`.

    The step maps the cell over the leading batch dims of `x` (those beyond the cell's own input
    rank of 1); its output `y` is the new state, or its first entry `h` for a tuple state (LSTM)."""
    import equinox as eqx

    params, static = eqx.partition(cell, eqx.is_array)

    def step(params, carry, x):
        module = eqx.combine(params, static)
        apply = lambda x_, c_: module(x_, c_)
        for _ in range(jnp.ndim(x) - 1):
            apply = jax.vmap(apply)
        carry = apply(x, carry)
        return carry, (carry[0] if isinstance(carry, tuple) else carry)

    return step, params


class _HaikuStep:
    """A step from a Haiku core; `init(key, x, carry)` gives its params."""

    def __init__(self, make_core: Callable):
        import haiku as hk

        self._transformed = hk.without_apply_rng(hk.transform(lambda x, state: make_core()(x, state)))

    def init(self, key, x, carry) -> PyTree:
        return self._transformed.init(key, x, carry)

    def __call__(self, params, carry, x):
        y, carry = self._transformed.apply(params, x, carry)
        return carry, y


def haiku(make_core: Callable) -> _HaikuStep:
    """A Haiku RNN core (`hk.GRU`, `hk.LSTM`, `hk.VanillaRNN`, ...), built by `make_core()` inside
    the transform, as a step: `step.init(key, x, carry)` gives the params, `step(params, carry, x)`
    calls `core(x, carry) -> (y, carry)` and returns `(carry, y)`."""
    return _HaikuStep(make_core)


def from_torch(module) -> tuple[Cell, PyTree]:
    """A single-layer, unidirectional `torch.nn.RNN`, `nn.LSTM` or `nn.GRU` as a jaxbptt `Cell`
    (the built-in cell with its hand-derived kernel) and params holding the module's weights.

    The layouts match exactly: PyTorch's gate orders (LSTM i, f, g, o; GRU r, z, n, with the
    recurrent bias inside the reset gate's product) are jaxbptt's. The LSTM carry is
    `LSTMState(h, c)`; PyTorch's `(h_0, c_0)` map to it directly.
    """
    import torch

    if not isinstance(module, (torch.nn.RNN, torch.nn.LSTM, torch.nn.GRU)):
        raise TypeError(f"from_torch converts torch.nn.RNN, LSTM or GRU; got {type(module).__name__}.")
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
        params = {"W_x": w["weight_ih_l0"].T, "W_h": w["weight_hh_l0"].T, "b": b_ih + b_hh}
        cell = lstm(H)
    elif isinstance(module, torch.nn.GRU):
        params = {"W_x": w["weight_ih_l0"].T, "b_x": b_ih, "W_h": w["weight_hh_l0"].T, "b_h": b_hh}
        cell = gru(H)
    else:
        params = {"W_xh": w["weight_ih_l0"].T, "W_hh": w["weight_hh_l0"].T, "b_h": b_ih + b_hh}
        cell = elman(H, activation=module.nonlinearity)
    return cell, jax.tree.map(jnp.asarray, params)


__all__ = ["equinox", "flax_linen", "flax_nnx", "from_torch", "haiku"]
