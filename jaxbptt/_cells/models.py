"""Deep models from Cells: stacked layers with dropout between them, a token embedding, and
`generate`, which runs a trained language model forward from a prompt.

Dropout needs randomness at every step without giving up pure steps: its key travels in the input.
A model built with `dropout > 0` takes `x = (inputs, key)` at each step, `key` a typed key or raw
key data (uint32, shape (2,)); with `key=None`, or plain `inputs`, the layers run without dropout
(evaluation). One key
per step, e.g. `(xs, jax.random.key_data(jax.random.split(key, T)))`, keeps the data a plain array
that `online_tbptt` can buffer and `vmap` can batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from .._cells.rnn import Cell
from .._types import PyTree


def _check_rate(dropout) -> None:
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"dropout must be a float in [0, 1) (the probability of zeroing a unit); got dropout={dropout!r}.")


def _as_key(key):
    return key if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else jax.random.wrap_key_data(key)


def _drop(y, key, rate: float):
    keep = jax.random.bernoulli(key, 1.0 - rate, y.shape)
    return jnp.where(keep, y / (1.0 - rate), jnp.zeros((), y.dtype)).astype(y.dtype)


def stacked_cells(cells: tuple[Cell, ...], *, residual: bool = False, dropout: float = 0.0) -> Cell:
    """The Cell case of `jaxbptt.stacked`: layer params and carries are tuples, one per layer."""
    _check_rate(dropout)
    from .._cells.combinators import stacked  # the step combinator, which dispatches Cells here

    inner = stacked(*(c.step for c in cells), residual=residual)

    def init(key, input_size: int, dtype=jnp.float32):
        params, x = [], jax.ShapeDtypeStruct((input_size,), dtype)
        for cell, k in zip(cells, jax.random.split(key, len(cells))):
            p = cell.init(k, x.shape[-1], dtype)
            _, x = jax.eval_shape(cell.step, p, cell.initial_carry((), dtype), x)
            params.append(p)
        return tuple(params)

    def initial_carry(batch_shape=(), dtype=jnp.float32):
        return tuple(c.initial_carry(batch_shape, dtype) for c in cells)

    if dropout == 0:
        return Cell(init, initial_carry, inner)

    def step(params, carry, inputs):
        x, key = inputs if isinstance(inputs, tuple) and len(inputs) == 2 else (inputs, None)
        new_carry = []
        for i, (cell, p, c) in enumerate(zip(cells, params, carry)):
            c, y = cell.step(p, c, x)
            if residual and i > 0:
                y = y + x
            if key is not None and i < len(cells) - 1:
                y = _drop(y, jax.random.fold_in(_as_key(key), i), dropout)
            new_carry.append(c)
            x = y
        return tuple(new_carry), x

    return Cell(init, initial_carry, step)


def embedding(cell: Cell, vocab_size: int, dim: int) -> Cell:
    """A Cell whose input is token ids: each step looks up a learned `dim`-vector per id and feeds
    it to `cell`.

    The input `x` is an int array of the batch shape, or its one-hot encoding (float,
    `(*batch_shape, vocab_size)`), or a pair `(ids, key)` whose key goes on to the inner cell (for
    the dropout of `jaxbptt.stacked`). Ids outside `[0, vocab_size)` are clamped into it, as
    `jnp.take(..., mode="clip")` does: a negative id reads row 0, an id `>= vocab_size` the last
    row (and their gradients go there). Check ids in the data pipeline.

    Returns:
      A `Cell` with params `{"embed": (vocab_size, dim), "cell": inner params}`; `init(key,
      input_size)` takes `input_size=vocab_size`.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxbptt as jb
      >>> model = jb.with_readout(jb.embedding(jb.lstm(16), vocab_size=30, dim=8), 30)
      >>> params = model.init(jax.random.key(0), 30)
      >>> ids = jnp.zeros((12, 4), jnp.int32)                       # (T, batch) token ids
      >>> final, logits = jb.unroll(model.step, params, model.initial_carry((4,)), ids)
      >>> logits.shape
      (12, 4, 30)
    """
    for name, value in (("vocab_size", vocab_size), ("dim", dim)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"embedding needs {name} as a positive int; got {name}={value!r}.")

    def init(key, input_size: int = vocab_size, dtype=jnp.float32):
        if input_size != vocab_size:
            raise ValueError(f"an embedding of vocab_size={vocab_size} takes input_size={vocab_size} (token ids); "
                             f"got input_size={input_size!r}.")
        k_embed, k_cell = jax.random.split(key)
        return {"embed": jax.random.normal(k_embed, (vocab_size, dim), dtype), "cell": cell.init(k_cell, dim, dtype)}

    def lookup(embed, ids):
        if jnp.issubdtype(ids.dtype, jnp.integer):
            # jnp.take's default mode fills out-of-range rows with NaN; clamping keeps a stray id finite.
            return jnp.take(embed, ids, axis=0, mode="clip")
        return (ids @ embed).astype(embed.dtype)  # one-hot rows

    def step(params, carry, x):
        if isinstance(x, tuple):
            ids, key = x
            return cell.step(params["cell"], carry, (lookup(params["embed"], ids), key))
        return cell.step(params["cell"], carry, lookup(params["embed"], x))

    return Cell(init, cell.initial_carry, step)


def generate(step, params: PyTree, carry: PyTree, prompt: jax.Array, length: int, *, key=None,
             temperature: float = 1.0) -> jax.Array:
    """Run a trained language model forward from a prompt, feeding each chosen token back in.

    Roughly::

      carry, logits = unroll(step, params, carry, prompt); logits = logits[-1]
      for t in range(length):
        token = argmax(logits) if key is None else categorical(key_t, logits / temperature)
        carry, logits = step(params, carry, token)

    Args:
      step: `step(params, carry, ids) -> (carry, logits)`, `logits` shaped `(*batch_shape, vocab)`.
        For a model with dropout, pass `lambda p, c, ids: model.step(p, c, (ids, None))`.
      params, carry: the trained parameters and the starting carry.
      prompt: int ids, time-major `(P, *batch_shape)`, P >= 1.
      length: the number of tokens to generate (static).
      key: None for greedy decoding (argmax), or a key to sample.
      temperature: divides the logits before sampling (> 0; lower is closer to greedy).

    Returns:
      The generated ids, shape `(length, *batch_shape)` (the prompt not included).

    Examples:
      >>> import jax, jax.numpy as jnp, jaxbptt as jb
      >>> model = jb.with_readout(jb.embedding(jb.gru(16), 10, 8), 10)
      >>> params = model.init(jax.random.key(0), 10)
      >>> prompt = jnp.array([[1, 2], [3, 4]])                       # (P, batch)
      >>> jb.generate(model.step, params, model.initial_carry((2,)), prompt, 5, key=jax.random.key(1)).shape
      (5, 2)
    """
    prompt = jnp.asarray(prompt)
    if not jnp.issubdtype(prompt.dtype, jnp.integer) or prompt.ndim < 1 or prompt.shape[0] < 1:
        raise ValueError(f"prompt must be int token ids shaped (P, *batch_shape) with P >= 1; got "
                         f"{prompt.dtype}{list(prompt.shape)}.")
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be a positive int (tokens to generate); got length={length!r}.")
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a float > 0; got temperature={temperature!r}.")
    carry, logits = lax.scan(lambda c, x: step(params, c, x), carry, prompt)
    keys = jax.random.split(key, length) if key is not None else jnp.zeros((length,))

    def one(state, k):
        c, logits = state
        if key is None:
            token = jnp.argmax(logits, axis=-1)
        else:
            token = jax.random.categorical(k, logits / temperature, axis=-1)
        token = token.astype(prompt.dtype)
        c, logits = step(params, c, token)
        return (c, logits), token

    _, tokens = lax.scan(one, (carry, logits[-1]), keys)
    return tokens
