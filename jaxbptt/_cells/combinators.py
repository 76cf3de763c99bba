"""Step combinators: a step in, a step out, so that every gradient option keeps working with no
special case in the engine. Over kernel-backed steps (`jaxbptt.Step`) they return kernel-backed
steps (see `_combinator_kernels.py`), so a mask or a second layer costs what it adds."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .. import _validate as v
from .._cells.combinator_kernels import masked_kernel, resettable_kernel, stacked_kernel
from .._engine.kernel import Kernel, Step, closed, generic_kernel, reparametrized
from .._cells.rnn import Cell
from .._cells.models import stacked_cells
from .._types import PyTree, StepFn


def _over_rows(flags: jax.Array, leaf: jax.Array) -> jax.Array:
    """`flags` (batch shape) broadcast against a leaf whose leading dims are that batch shape."""
    return flags.reshape(flags.shape + (1,) * (leaf.ndim - flags.ndim))


def _split_input(inputs, combinator: str, name: str, example: str):
    """A combinator's input at one step, the pair `(x, flags)`; a clear error for anything else (the
    step's plain `x`, most often, when the flags were forgotten)."""
    if not isinstance(inputs, (tuple, list)) or len(inputs) != 2:
        raise TypeError(
            f"{combinator}(step) takes at each step the pair (x, {name}), {name} a bool array of the batch shape: "
            f"pass xs = (xs, {name}) with {name} of shape (T, *batch_shape){example}; got the step input "
            f"{v.describe(inputs)}."
        )
    return inputs


def _check_flags(name: str, flags, tree: PyTree, what: str) -> None:
    if not jnp.issubdtype(jnp.result_type(flags), jnp.bool_):
        raise TypeError(f"{name} must be a bool array of the batch shape; got dtype {jnp.result_type(flags).name}. "
                        f"The step's input is the pair (x, {name}).")
    shape = np.shape(flags)
    for keypath, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if np.shape(leaf)[: len(shape)] != shape:
            raise ValueError(
                f"{name} must have the batch shape, the leading dims of every {what} leaf; got {name} of "
                f"shape {shape} but {what}{jax.tree_util.keystr(keypath)} has shape {np.shape(leaf)}."
            )


def masked(step: StepFn) -> StepFn:
    """A step that skips masked-out rows: its input is `(x, m)`, `m` a bool array of the batch shape.

    Where `m` is false the carry passes through unchanged and `y` is zeros, so padded steps
    change neither the carry nor any gradient through it. Their loss `loss_fn(0, target)` is not
    zero in general: to sum the loss over real steps only, pass the mask in the targets too and
    zero the padded rows' loss, as in the example. Padded inputs must be finite (zeros, say):
    a zero cotangent times a non-finite residual is still NaN, and jaxbptt never hides a NaN.

    Raises:
      TypeError: (when the step is traced) an input that is not a pair `(x, mask)`, or a mask that
        is not bool.
      ValueError: a mask whose shape is not the carry's batch shape.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxbptt as jb
      >>> cell = jb.elman(4)
      >>> params = cell.init(jax.random.key(0), 2)
      >>> xs = jnp.ones((5, 3, 2), jnp.float32)
      >>> mask = jb.lengths_to_mask(jnp.array([5, 2, 0]), 5)
      >>> final, ys = jb.unroll(jb.masked(cell.step), params, cell.initial_carry((3,)), (xs, mask))
      >>> bool(jnp.all(final[2] == 0)), bool(jnp.all(ys[2:, 1] == 0))
      (True, True)

      The loss over real steps only: the mask travels in the targets and zeroes padded rows.

      >>> targets = jnp.ones((5, 3, 4), jnp.float32)
      >>> def masked_mse(y, target):
      ...   t, m = target
      ...   return jnp.sum(jnp.where(m[:, None], (y - t) ** 2, 0.0))
      >>> f = jb.value_and_grad(jb.masked(cell.step), masked_mse)
      >>> (loss, _), grads = f(params, cell.initial_carry((3,)), (xs, mask), (targets, mask))
      >>> plain = jb.value_and_grad(cell.step, lambda y, t: jnp.sum((y - t) ** 2))
      >>> (row0, _), _ = plain(params, cell.initial_carry((1,)), xs[:, :1], targets[:, :1])    # 5 steps
      >>> (row1, _), _ = plain(params, cell.initial_carry((1,)), xs[:2, 1:2], targets[:2, 1:2])  # 2 steps
      >>> bool(jnp.allclose(loss, row0 + row1))
      True
    """

    def masked_step(params, carry, inputs):
        x, m = _split_input(inputs, "masked", "mask", ", e.g. jaxbptt.lengths_to_mask(lengths, T)")
        _check_flags("mask", m, carry, "carry")
        new_carry, y = step(params, carry, x)
        carry = jax.tree.map(lambda new, old: jnp.where(_over_rows(m, new), new, old), new_carry, carry)
        return carry, jax.tree.map(lambda a: jnp.where(_over_rows(m, a), a, jnp.zeros((), a.dtype)), y)

    if isinstance(step, Step):  # the mask passes the params through, so the inner step's closure is its own
        opened = None if step.closure is None else masked(step.opened)
        return Step(masked_step, lambda params, carry, u: masked_kernel(step.make_kernel(params, carry, u[0]), u[1]),
                    closure=step.closure, opened=opened)
    return masked_step


def lengths_to_mask(lengths: jax.Array, length: int) -> jax.Array:
    """A time-major `(length, *lengths.shape)` bool mask, true where `t < lengths` (right padding)."""
    if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 0:
        raise ValueError(f"length must be a non-negative int (the number of time steps); got length={length!r}.")
    lengths = jnp.asarray(lengths)
    if not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise TypeError(f"lengths must be an integer array; got dtype {lengths.dtype}.")
    t = jnp.arange(length).reshape((length,) + (1,) * lengths.ndim)
    return t < lengths[None]


def resettable(step: StepFn, initial_carry: PyTree) -> StepFn:
    """A step whose input is `(x, reset)`: where `reset` (a bool array of the batch shape) is true,
    the carry is replaced by `initial_carry` (broadcast over the batch) before the step - episode
    boundaries, as in reinforcement learning. Gradients stop at a reset, as across episodes.
    `initial_carry` may be learned: `jax.grad` with respect to it (under `jit` too) is as through
    `lax.scan`, and over a kernel-backed step (a built-in cell's) the kernel computes it.

    Raises:
      TypeError: (when the step is traced) an input that is not a pair `(x, reset)`, a reset that is
        not bool, or an `initial_carry` whose pytree structure is not the carry's.
      ValueError: a reset whose shape is not the carry's batch shape, or an `initial_carry` leaf
        that does not broadcast to the carry's leaf.

    Examples:
      >>> import jax.numpy as jnp, jaxbptt as jb
      >>> count = lambda p, c, x: (c + x, c + x)
      >>> resets = jnp.array([[False], [False], [True], [False]])
      >>> _, ys = jb.unroll(jb.resettable(count, jnp.zeros(())), None, jnp.zeros((1,)), (jnp.ones((4, 1)), resets))
      >>> ys[:, 0].tolist()
      [1.0, 2.0, 1.0, 2.0]
    """

    def fresh(initial, carry):
        return jax.tree.map(lambda init, c: jnp.broadcast_to(jnp.asarray(init, c.dtype), c.shape), initial, carry)

    def reset_step(step, initial, params, carry, inputs):
        x, reset = _split_input(inputs, "resettable", "reset", "")
        _check_flags("reset", reset, carry, "carry")
        _check_initial_carry(initial, carry)
        carry = jax.tree.map(lambda f, c: jnp.where(_over_rows(reset, c), f, c), fresh(initial, carry), carry)
        return step(params, carry, x)

    def resettable_step(params, carry, inputs):
        return reset_step(step, initial_carry, params, carry, inputs)

    if not isinstance(step, Step):
        return resettable_step
    # Kernel-backed: the initial carry is a declared closure (a parameter of the opened step), so that
    # `jax.grad` with respect to it reaches the kernel, which returns its gradient.
    inner = step if step.closure is None else step.opened

    def open_step(params, carry, inputs):
        return reset_step(inner, params[1], params[0], carry, inputs)

    def open_kernel(params, carry, u):
        return resettable_kernel(inner.make_kernel(params[0], carry, u[0]), fresh, u[1])

    opened = Step(open_step, open_kernel)  # params: (inner params, initial_carry)
    if step.closure is None:
        return closed(resettable_step, opened, initial_carry)
    # The inner step's own closure joins this one: params (params, (inner closure, initial_carry)).
    opened = reparametrized(opened, lambda pc: ((pc[0], pc[1][0]), pc[1][1]))
    return closed(resettable_step, opened, (step.closure, initial_carry))


def _check_initial_carry(initial: PyTree, carry: PyTree) -> None:
    """`resettable`'s `initial_carry` is one carry: the carry's structure, each leaf broadcasting to
    the carry's leaf (its shape without the batch dims, or with them)."""
    if jax.tree.structure(initial) != jax.tree.structure(carry):
        raise TypeError(f"resettable's initial_carry must have the carry's pytree structure; initial_carry is "
                        f"{v.describe(initial)} but the carry is {v.describe(carry)}.")
    for (keypath, init), c in zip(jax.tree_util.tree_leaves_with_path(initial), jax.tree.leaves(carry)):
        try:
            fits = np.broadcast_shapes(np.shape(init), np.shape(c)) == np.shape(c)
        except ValueError:
            fits = False
        if not fits:
            where = jax.tree_util.keystr(keypath)
            raise ValueError(
                f"resettable's initial_carry{where} has shape {np.shape(init)}, which does not broadcast to the "
                f"carry{where}'s shape {np.shape(c)}; initial_carry is one carry, each leaf shaped like the carry's "
                "without its batch dims (or with them)."
            )


def stacked(*steps: StepFn, residual: bool = False, dropout: float = 0.0) -> StepFn:
    """A deep RNN: params and carry are tuples with one entry per layer, layer i's output is layer
    i+1's input, and the stacked step's output is the last layer's. With `residual=True`, each layer
    after the first adds its input to its output (the shapes must match).

    Given `Cell`s instead of steps, it returns a `Cell` (`init(key, input_size)` -> a tuple of layer
    params, `initial_carry(batch_shape)` -> a tuple of carries, and the stacked step) that
    `jaxbptt.with_readout` and `jaxbptt.embedding` accept. Only then may `dropout > 0` zero each
    unit between layers with that probability during training: the step's input is then
    `(x, key)`, a key per step (typed or raw key data); `key=None` or a plain `x` runs without dropout.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxbptt as jb
      >>> l1, l2 = jb.lstm(8), jb.gru(8)
      >>> step = jb.stacked(l1.step, l2.step, residual=True)
      >>> params = (l1.init(jax.random.key(0), 3), l2.init(jax.random.key(1), 8))
      >>> carry = (l1.initial_carry((2,)), l2.initial_carry((2,)))
      >>> carry, y = step(params, carry, jnp.ones((2, 3)))
      >>> y.shape
      (2, 8)
      >>> model = jb.with_readout(jb.stacked(jb.lstm(8), jb.lstm(8), dropout=0.1), 2)
      >>> params = model.init(jax.random.key(0), 3)
      >>> xs, keys = jnp.ones((5, 4, 3)), jax.random.key_data(jax.random.split(jax.random.key(1), 5))
      >>> final, ys = jb.unroll(model.step, params, model.initial_carry((4,)), (xs, keys))
      >>> ys.shape
      (5, 4, 2)
    """
    if steps and all(isinstance(s, Cell) for s in steps):
        return stacked_cells(steps, residual=residual, dropout=dropout)
    if dropout:
        raise TypeError(f"stacked(dropout={dropout!r}) needs Cells (jaxbptt.lstm(...), ...), not step functions.")
    if not steps:
        raise ValueError("stacked needs at least one step.")
    for i, s in enumerate(steps):
        if not callable(s):
            raise TypeError(f"stacked: step {i} must be callable; got {s!r}.")

    def stacked_step(params, carry, x):
        for name, value in (("params", params), ("carry", carry)):
            if not isinstance(value, (tuple, list)) or len(value) != len(steps):
                raise ValueError(
                    f"stacked with {len(steps)} layers needs {name} as a tuple of {len(steps)} entries, one per "
                    f"layer; got {type(value).__name__}"
                    + (f" of length {len(value)}." if isinstance(value, (tuple, list)) else ".")
                )
        new_carry = []
        for i, (s, p, c) in enumerate(zip(steps, params, carry)):
            c, y = s(p, c, x)
            if residual and i > 0:
                if jax.tree.structure(y) != jax.tree.structure(x) or any(
                    np.shape(a) != np.shape(b) for a, b in zip(jax.tree.leaves(y), jax.tree.leaves(x))
                ):
                    raise ValueError(
                        f"stacked(residual=True): layer {i} output {jax.eval_shape(lambda: y)} does not match its "
                        f"input {jax.eval_shape(lambda: x)}, so they cannot be added."
                    )
                y = jax.tree.map(jnp.add, y, x)
            new_carry.append(c)
            x = y
        return (tuple(new_carry) if isinstance(carry, tuple) else new_carry), x

    if not all(isinstance(s, Step) for s in steps):
        return stacked_step
    kernel = lambda params, carry, x: _stacked_kernel(steps, residual, stacked_step, params, carry, x)
    if all(s.closure is None for s in steps):
        return Step(stacked_step, kernel)
    # The layers' closures, one entry per layer: params (layer params, layer closures).
    opened = stacked(*(s if s.closure is None else s.opened for s in steps), residual=residual)
    opened = reparametrized(opened, lambda pc: tuple(p if s.closure is None else (p, c)
                                                     for s, p, c in zip(steps, pc[0], pc[1])))
    return closed(stacked_step, opened, tuple(s.closure for s in steps))


def _stacked_kernel(steps, residual: bool, stacked_step, params, carry, x) -> Kernel:
    """The layers' kernels composed, each built for its layer's input; the generic kernel when a
    layer's `out` is not part of its carry (the reverse loop needs every layer's previous `out`)."""
    layers = []
    for s, p, c in zip(steps, params, carry):
        layers.append(s.make_kernel(p, c, x))
        _, x = jax.eval_shape(s, p, c, x)
    if any(layer.previous_out is None for layer in layers):
        return generic_kernel(stacked_step, params, carry, x)
    return stacked_kernel(layers, residual)

