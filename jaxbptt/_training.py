"""Training: a pure train step, and a compiled training loop that vmaps over hyperparameters."""

from __future__ import annotations

import inspect
from typing import Callable, Optional

import jax
import optax
from jax import lax

from . import _validate as v
from ._core.api import value_and_grad
from ._types import LossFn, PyTree, StepFn


# The options of `value_and_grad` that a train step cannot take, and why.
_REFUSED = {
    "argnums": "the optimizer updates the parameters only (argnums=0); for gradients with respect to the "
               "carry or the inputs, call jaxbptt.value_and_grad directly",
}


def make_train_step(step: StepFn, loss_fn: LossFn, optimizer: optax.GradientTransformation,
                    **gradient_options) -> Callable:
    """A pure training step: jaxbptt gradients, then one optax update.

    `gradient_options` are those of `jaxbptt.value_and_grad` except `argnums` (truncation, clip_norm,
    clip_scope, remat, unroll, diagnostics, has_aux, time_axis, check_finite, axis_name); values may
    be traced, so `jax.vmap` over a truncation length or a clip norm works. With
    `check_finite=True` the step compiles its gradient itself: call it without `jax.jit`.

    Returns:
      `train_step(params, opt_state, carry, xs, targets) -> (params, opt_state, loss, final_carry)`,
      jit- and vmap-able; with `diagnostics=True` or `has_aux=True` a fifth element, a dict with
      the keys `"diag"` (a `jaxbptt.Diagnostics`) and/or `"aux"` (the loss's aux, stacked over time).

    Raises:
      TypeError: when built, for an option it cannot take (`argnums`) or does not know.

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
      >>> train_step = jax.jit(jb.make_train_step(model.step, jb.tasks.weighted_mse, opt, diagnostics=True))
      >>> *_, extras = train_step(params, opt_state, model.initial_carry((8,)), xs, targets)
      >>> extras["diag"].adjoint_norm.shape
      (20,)
    """
    known = set(inspect.signature(value_and_grad).parameters) - {"step", "loss_fn"}
    for name in gradient_options:
        if name in _REFUSED:
            raise TypeError(f"make_train_step cannot take the option {name}={gradient_options[name]!r}: {_REFUSED[name]}.")
        if name not in known:
            raise TypeError(f"make_train_step got an unknown option {name!r}; it takes the options of "
                            f"jaxbptt.value_and_grad: {', '.join(sorted(known - set(_REFUSED)))}.")
    grad_fn = value_and_grad(step, loss_fn, **gradient_options)
    keys = [k for k in ("aux", "diag") if gradient_options.get("has_aux" if k == "aux" else "diagnostics", False)]

    def train_step(params, opt_state, carry, xs, targets):
        (loss, final_carry, *rest), grads = grad_fn(params, carry, xs, targets)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        out = (optax.apply_updates(params, updates), opt_state, loss, final_carry)
        return out + ((dict(zip(keys, rest)),) if keys else ())

    return train_step


def train_loop(train_step: Callable, batch_fn: Callable, iterations: int, *, eval_fn: Optional[Callable] = None,
               eval_every: Optional[int] = None) -> Callable:
    """`iterations` training steps as one `lax.scan`, so that a whole run is one compiled call and a
    sweep is `jax.vmap` over runs.

    Args:
      train_step: from `make_train_step`.
      batch_fn: `batch_fn(key) -> (carry, xs, targets)`, a fresh batch per iteration.
      iterations: the number of steps (static).
      eval_fn: `eval_fn(params) -> pytree` (a held-out loss, an accuracy ...), run every `eval_every`
        iterations on the parameters after that iteration.
      eval_every: a positive int dividing `iterations`; required with `eval_fn`.

    Returns:
      `run(params, opt_state, key) -> (params, opt_state, losses)`, `losses` of shape (iterations,);
      when `eval_fn` is given or `train_step` returns a fifth element, a fourth element: a dict
      with `"eval"` (stacked over the iterations // eval_every evaluations) and the train step's
      `"diag"` / `"aux"` (stacked over iterations). The losses are the same with or without `eval_fn`.

    Raises:
      ValueError: `iterations` or `eval_every` out of range.
      TypeError: `eval_every` without `eval_fn`; `batch_fn` not callable, or (when `run` is traced)
        returning anything but a tuple `(carry, xs, targets)`. An error of `train_step` on the batch
        that `batch_fn` returns is raised again, naming `batch_fn` and what it returned.

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

      Held-out evaluation every few iterations:

      >>> held_out = batch(jax.random.key(99))
      >>> evaluate = lambda p: step(p, opt.init(p), *held_out)[2]
      >>> run = jax.jit(jb.train_loop(step, batch, iterations=6, eval_fn=evaluate, eval_every=3))
      >>> _, _, losses, history = run(seeds[0], opt.init(seeds[0]), jax.random.key(0))
      >>> losses.shape, history["eval"].shape
      ((6,), (2,))

    Initialise the params of each seed outside `vmap`, as above: vmapping an orthogonal
    initialisation runs a batched QR, which can deadlock JAX's CPU backend on two cores (seen with
    JAX 0.10; `init_seeds` in `examples/experiments.py` does it).
    """
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be a positive int; got iterations={iterations!r}.")
    if eval_fn is not None or eval_every is not None:
        if eval_fn is None or not callable(eval_fn):
            raise TypeError(f"eval_every needs eval_fn, a function eval_fn(params) -> pytree; got eval_fn={eval_fn!r}.")
        if isinstance(eval_every, bool) or not isinstance(eval_every, int) or eval_every < 1 or iterations % eval_every:
            raise ValueError(f"eval_every must be a positive int dividing iterations={iterations}; got "
                             f"eval_every={eval_every!r}.")
    v.check_callable("batch_fn", batch_fn)
    every = eval_every or iterations

    def run(params: PyTree, opt_state: PyTree, key: jax.Array):
        def one(state, key):
            params, opt_state = state
            params, opt_state, loss, _, *extras = _train_on_batch(train_step, batch_fn, params, opt_state, key)
            return (params, opt_state), (loss, extras[0] if extras else {})

        def evaluation_period(state, keys):
            state, record = lax.scan(one, state, keys)
            return state, (record, eval_fn(state[0]) if eval_fn is not None else None)

        keys = jax.random.split(key, iterations).reshape(iterations // every, every)
        (params, opt_state), ((losses, history), evals) = lax.scan(evaluation_period, (params, opt_state), keys)
        flat = lambda a: a.reshape((iterations,) + a.shape[2:])
        losses, history = flat(losses), jax.tree.map(flat, history)
        if eval_fn is not None:
            history["eval"] = evals
        return (params, opt_state, losses) + ((history,) if history else ())

    return run


_BATCH = ("batch_fn(key) must return a tuple (carry, xs, targets): the initial carry, then the time-major inputs "
          "and targets of one batch, as train_step takes them")


def _train_on_batch(train_step: Callable, batch_fn: Callable, params: PyTree, opt_state: PyTree, key: jax.Array):
    """One training step on `batch_fn(key)`, with errors that name `batch_fn` and what it returned."""
    batch = batch_fn(key)
    if not isinstance(batch, (tuple, list)) or len(batch) != 3:
        if isinstance(batch, (tuple, list)):
            what = f"a {type(batch).__name__} of {len(batch)} entries"
        else:
            what = "an array" if hasattr(batch, "shape") else f"a {type(batch).__name__}"
        raise TypeError(f"{_BATCH}; got {what}, {v.describe(batch)}.")
    try:
        return train_step(params, opt_state, *batch)
    except (TypeError, ValueError) as err:
        # The batch is the likeliest culprit (a wrong order, a batch-major layout, mismatched lengths),
        # and the error from inside the gradient names train_step's arguments, not where they came from.
        kind = TypeError if isinstance(err, TypeError) else ValueError
        raise kind(f"train_step failed on the batch from batch_fn, (carry, xs, targets) = {v.describe(tuple(batch))} "
                   f"({_BATCH}): {err}") from err
