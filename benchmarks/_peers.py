"""Peer implementations of the same models (cell, 10-unit readout, per-step MSE on the same data),
each with its own parameters and its own float64 oracle. A missing library raises ImportError,
which the harness reports as a skipped row."""

from __future__ import annotations

import copy
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ._methods import Bound
from ._problems import OUTPUT_SIZE, Problem, mse


def _cast(tree, dtype):
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def _jax_peer(loss, params, problem: Problem, loss64=None) -> Bound:
    """A JAX peer: `loss(params, xs, targets)` differentiated by autodiff; its oracle is `loss64`
    (default: `loss` itself) on the same values in float64."""
    run = jax.value_and_grad(loss)
    args = (params, problem.xs, problem.targets)
    f64 = lambda: jax.jit(jax.value_and_grad(loss64 or loss))(*_cast(args, jnp.float64))[1]
    return Bound(run, args, oracle=f64)


def flax_rnn(problem: Problem) -> Bound:
    """Flax linen `nn.RNN` over the matching cell (`SimpleCell`, `LSTMCell`, `GRUCell`), then `nn.Dense`."""
    import flax.linen as nn

    if problem.cell not in ("elman", "lstm", "gru"):
        raise ImportError(f"Flax has no cell matching {problem.cell!r}")
    cell = {"elman": nn.SimpleCell, "lstm": nn.LSTMCell, "gru": nn.GRUCell}[problem.cell]

    def model(dtype):
        class Model(nn.Module):
            @nn.compact
            def __call__(self, xs):
                ys = nn.RNN(cell(problem.H, param_dtype=dtype), time_major=True)(xs)
                return nn.Dense(OUTPUT_SIZE, param_dtype=dtype)(ys)

        return Model()

    def loss_for(dtype):
        m = model(dtype)
        return lambda params, xs, targets: jnp.sum(jax.vmap(mse)(m.apply(params, xs), targets))

    params = model(jnp.float32).init(jax.random.key(1), problem.xs)
    return _jax_peer(loss_for(jnp.float32), params, problem, loss_for(jnp.float64))


def equinox_scan(problem: Problem) -> Bound:
    """Equinox `LSTMCell` / `GRUCell`, vmapped over the batch inside a `lax.scan`, then a linear readout."""
    import equinox as eqx

    if problem.cell not in ("lstm", "gru"):
        raise ImportError(f"Equinox has no cell matching {problem.cell!r}")
    cell = {"lstm": eqx.nn.LSTMCell, "gru": eqx.nn.GRUCell}[problem.cell](problem.D, problem.H, key=jax.random.key(1))
    cell_params, static = eqx.partition(cell, eqx.is_array)
    cell_params = _cast(cell_params, jnp.float32)
    w = jax.random.normal(jax.random.key(2), (problem.H, OUTPUT_SIZE), jnp.float32) / np.sqrt(problem.H)
    readout = (w, jnp.zeros(OUTPUT_SIZE, jnp.float32))
    zeros = jnp.zeros((problem.B, problem.H), jnp.float32)
    carry = (zeros, zeros) if problem.cell == "lstm" else zeros

    def loss(params, xs, targets):
        cell_params, (w, b) = params
        module = eqx.combine(cell_params, static)

        def body(c, inputs):
            x, t = inputs
            c = jax.vmap(module)(x, c)
            h = c[0] if isinstance(c, tuple) else c
            return c, mse(h @ w + b, t)

        _, losses = lax.scan(body, jax.tree.map(lambda a: a.astype(xs.dtype), carry), (xs, targets))
        return jnp.sum(losses)

    return _jax_peer(loss, (cell_params, readout), problem)


def torch_rnn(problem: Problem) -> Bound:
    """PyTorch `nn.RNN` / `nn.LSTM` / `nn.GRU` and `nn.Linear` (cuDNN on a GPU)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads must not steal JAX's cores
    import torch

    if problem.cell not in ("elman", "lstm", "gru"):
        raise ImportError(f"PyTorch has no module matching {problem.cell!r}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    rnn = {"elman": torch.nn.RNN, "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[problem.cell](problem.D, problem.H)
    model = torch.nn.Sequential()  # holds both modules for .to() and .parameters()
    model.add_module("rnn", rnn)
    model.add_module("readout", torch.nn.Linear(problem.H, OUTPUT_SIZE))

    def bind(model, dtype):
        model = model.to(device=device, dtype=dtype)
        xs = torch.from_numpy(np.asarray(problem.xs, np.float64)).to(device=device, dtype=dtype)
        targets = torch.from_numpy(np.asarray(problem.targets, np.float64)).to(device=device, dtype=dtype)
        params = list(model.parameters())

        def run():
            for p in params:
                p.grad = None
            ys, _ = model.rnn(xs)
            loss = ((model.readout(ys) - targets) ** 2).mean(dim=(1, 2)).sum()
            loss.backward()
            if device == "cuda":
                torch.cuda.synchronize()
            return [p.grad for p in params]

        return run

    f64 = lambda: [g.detach().cpu().numpy() for g in bind(copy.deepcopy(model), torch.float64)()]
    return Bound(bind(model, torch.float32), kind="torch", oracle=f64)
