"""Training: a pure train step, and a compiled training loop that vmaps over hyperparameters."""

from __future__ import annotations

from typing import Callable

import jax
import optax
from jax import lax

from ._api import value_and_grad
from ._types import LossFn, PyTree, StepFn


def make_train_step(step: StepFn, loss_fn: LossFn, optimizer: optax.GradientTransformation,
                    **gradient_options) -> Callable:
    """A pure training step: jaxbptt gradients, then one optax update.

    `gradient_options` are those of `jaxbptt.value_and_grad` (truncation, clip_norm, remat, unroll);
    values may be traced, so `jax.vmap` over a truncation length or a clip norm works.

    Returns:
      `train_step(params, opt_state, carry, xs, targets) -> (params, opt_state, loss, final_carry)`,
      jit- and vmap-able.

    Examples:
      >>> import jax, jax.numpy as jnp, optax, jaxbptt as jb
      >>> model = jb.with_readout(jb.lstm(16), 1)
      >>> opt = optax.adam(1e-2)
      >>> train_step = jax.jit(jb.make_train_step(model.step, jb.tasks.weighted_mse, opt, clip_norm=1.0))
      >>> params = model.init(jax.random.key(0), 2)
      >>> xs, targets = jb.tasks.adding(jax.random.key(1), batch_size=8, length=20)
      >>> params, opt_state, loss, _ = train_step(params, opt.init(params), model.initial_carry((8,)), xs, targets)
      >>> loss.shape
      ()
    """
    grad_fn = value_and_grad(step, loss_fn, **gradient_options)

    def train_step(params, opt_state, carry, xs, targets):
        (loss, final_carry), grads = grad_fn(params, carry, xs, targets)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, final_carry

    return train_step


def train_loop(train_step: Callable, batch_fn: Callable, iterations: int) -> Callable:
    """`iterations` training steps as one `lax.scan`, so that a whole run is one compiled call and a
    sweep is `jax.vmap` over runs.

    Args:
      train_step: from `make_train_step`.
      batch_fn: `batch_fn(key) -> (carry, xs, targets)`, a fresh batch per iteration.
      iterations: the number of steps (static).

    Returns:
      `run(params, opt_state, key) -> (params, opt_state, losses)`, `losses` of shape (iterations,).

    Examples:
      >>> import jax, optax, jaxbptt as jb
      >>> model = jb.with_readout(jb.gru(8), 1)
      >>> opt = optax.inject_hyperparams(optax.adam)(learning_rate=1e-2)
      >>> step = jb.make_train_step(model.step, jb.tasks.weighted_mse, opt)
      >>> batch = lambda key: (model.initial_carry((8,)), *jb.tasks.adding(key, 8, 12))
      >>> run = jax.jit(jb.train_loop(step, batch, iterations=5))
      >>> def sweep(lr, params, seed):                      # one run per (learning rate, seed)
      ...   state = opt.init(params)
      ...   state.hyperparams["learning_rate"] = lr
      ...   return run(params, state, jax.random.key(seed))[2]
      >>> seeds = [model.init(jax.random.key(s), 2) for s in range(3)]   # init outside vmap (see below)
      >>> params = jax.tree.map(lambda *a: jax.numpy.stack(a), *seeds)
      >>> lrs = jax.numpy.array([1e-3, 1e-2])
      >>> losses = jax.vmap(jax.vmap(sweep, (None, 0, 0)), (0, None, None))(lrs, params, jax.numpy.arange(3))
      >>> losses.shape
      (2, 3, 5)

    Initialise the params of each seed outside `vmap`, as above: vmapping an orthogonal
    initialisation runs a batched QR, which can deadlock JAX's CPU backend on two cores (seen with
    JAX 0.10; `jaxbptt.experiments.init_seeds` does it for you).
    """
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be a positive int; got iterations={iterations!r}.")

    def run(params: PyTree, opt_state: PyTree, key: jax.Array):
        def one(state, key):
            params, opt_state = state
            carry, xs, targets = batch_fn(key)
            params, opt_state, loss, _ = train_step(params, opt_state, carry, xs, targets)
            return (params, opt_state), loss

        (params, opt_state), losses = lax.scan(one, (params, opt_state), jax.random.split(key, iterations))
        return params, opt_state, losses

    return run
