"""Benchmark tasks for recurrent networks, as pure functions of a PRNG key.

Every task returns time-major batches `(xs, targets)`: `xs` of shape `(T, B, input_size)`, and
`targets` a pytree with leading axis T that carries its own mask, so the loss functions here are
per-step `loss_fn(y_t, target_t)` as `jaxbptt.value_and_grad` expects. No global state: the same key
gives the same batch.

- `adding`: the adding problem (Hochreiter & Schmidhuber 1997, in the form of Le et al. 2015).
- `copy_memory`: remember a short sequence of symbols over a long delay, then reproduce it.
- `digits`: scikit-learn's 8x8 handwritten digits read pixel by pixel (64 steps), fixed split.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Targets(NamedTuple):
    """Per-step targets and a weight (0 where the step has no target).

    Attributes:
      value: shape=(T, B, ...) (regression) or (T, B) int32 (classes).
      weight: shape=(T, B), the step's weight in the loss (1 where scored, 0 elsewhere).
    """

    value: jax.Array
    weight: jax.Array


# ------------------------------------------------------------------------------------------ adding

ADDING_BASELINE_MSE = 1.0 / 6.0  # predict the mean (1): the variance of the sum of two U(0, 1)


def adding(key: jax.Array, batch_size: int, length: int, dtype=jnp.float32) -> tuple[jax.Array, Targets]:
    """The adding problem: add the two numbers that carry a marker; answer at the last step.

    Each step's input is `(value, marker)`, values uniform in [0, 1); exactly two markers are 1, one
    at a uniformly drawn step of the first half and one of the second half. The target, scored at
    the last step only, is the sum of the two marked values. Predicting 1 always scores MSE 1/6
    (`ADDING_BASELINE_MSE`), the baseline a network must beat (Le, Jaitly & Hinton 2015).

    Returns:
      `xs` of shape `(length, batch_size, 2)` and `Targets(value=(length, batch_size, 1), weight)`.

    Examples:
      >>> import jax, jaxbptt as jb
      >>> xs, targets = jb.tasks.adding(jax.random.key(0), batch_size=4, length=10)
      >>> xs.shape, targets.value.shape, float(targets.weight[-1, 0]), float(targets.weight[0, 0])
      ((10, 4, 2), (10, 4, 1), 1.0, 0.0)
    """
    if length < 2:
        raise ValueError(f"adding needs length >= 2 (a marker in each half); got length={length}.")
    kv, k1, k2 = jax.random.split(key, 3)
    values = jax.random.uniform(kv, (length, batch_size), dtype)
    half = length // 2
    first = jax.random.randint(k1, (batch_size,), 0, half)
    second = jax.random.randint(k2, (batch_size,), half, length)
    t = jnp.arange(length)[:, None]
    markers = ((t == first[None]) | (t == second[None])).astype(dtype)
    total = jnp.sum(values * markers, axis=0)
    weight = (t == length - 1).astype(dtype) * jnp.ones((1, batch_size), dtype)
    value = (weight * total[None])[..., None]
    return jnp.stack([values, markers], axis=-1), Targets(value, weight)


def weighted_mse(y: jax.Array, target: Targets) -> jax.Array:
    """Per-step loss for regression targets: the weighted mean squared error over the batch."""
    err = jnp.sum((y - target.value) ** 2, axis=-1)
    return jnp.sum(target.weight * err) / target.weight.shape[0]


# ------------------------------------------------------------------------------------- copy memory


def copy_memory(key: jax.Array, batch_size: int, delay: int, length: int = 10, symbols: int = 8,
                dtype=jnp.float32) -> tuple[jax.Array, Targets]:
    """The copy (memory) task: read `length` random symbols, wait `delay` blank steps, then at the
    marker reproduce the symbols in order (as in Arjovsky, Shah & Bengio 2016).

    Inputs are one-hot over `symbols + 2` channels (the symbols, blank, marker); the sequence has
    `T = 2 * length + delay` steps and the last `length` are scored. A network without memory scores
    a cross-entropy of log(symbols) per scored step.

    Returns:
      `xs` of shape `(T, batch_size, symbols + 2)` and `Targets(value=(T, batch_size) int32, weight)`.

    Examples:
      >>> import jax, jaxbptt as jb
      >>> xs, targets = jb.tasks.copy_memory(jax.random.key(0), batch_size=2, delay=5, length=3)
      >>> xs.shape, int(targets.weight.sum())
      ((11, 2, 10), 6)
    """
    if delay < 1 or length < 1 or symbols < 2:
        raise ValueError(f"copy_memory needs delay >= 1, length >= 1, symbols >= 2; got {delay}, {length}, {symbols}.")
    T = 2 * length + delay
    seq = jax.random.randint(key, (length, batch_size), 0, symbols)
    blank, marker = symbols, symbols + 1
    tokens = jnp.concatenate([
        seq,
        jnp.full((delay - 1, batch_size), blank),
        jnp.full((1, batch_size), marker),
        jnp.full((length, batch_size), blank),
    ])
    scored = (jnp.arange(T) >= T - length)[:, None] * jnp.ones((1, batch_size))
    labels = jnp.concatenate([jnp.zeros((T - length, batch_size), jnp.int32), seq.astype(jnp.int32)])
    return jax.nn.one_hot(tokens, symbols + 2, dtype=dtype), Targets(labels, scored.astype(dtype))


def weighted_cross_entropy(logits: jax.Array, target: Targets) -> jax.Array:
    """Per-step loss for class targets: the weighted softmax cross-entropy, averaged over the batch."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, target.value[..., None], axis=-1)[..., 0]
    return jnp.sum(target.weight * nll) / target.weight.shape[0]


# ------------------------------------------------------------------------------------------ digits

DIGITS_TEST_SIZE = 360


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError("tasks.digits needs scikit-learn: pip install 'jaxbptt[tasks]' (or scikit-learn).") from err
    data = load_digits()
    return (data.images / 16.0).astype(np.float32), data.target.astype(np.int32)


def digits(split: str = "train", dtype=jnp.float32) -> tuple[jax.Array, Targets]:
    """Sequential digits: scikit-learn's 1,797 8x8 handwritten digits (shipped with scikit-learn, no
    download), each read pixel by pixel in row order as a 64-step sequence of one input, the class
    scored at the last step.

    The split is fixed: a permutation from seed 0, the last `DIGITS_TEST_SIZE` = 360 images for
    "test", the other 1,437 for "train".

    Returns:
      The whole split: `xs` of shape `(64, N, 1)` and `Targets(value=(64, N) int32, weight)`.
      `batches(key, xs, targets, batch_size)` draws minibatches from it.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test'; got {split!r}.")
    images, labels = _digits_arrays()
    order = np.random.default_rng(0).permutation(len(labels))
    chosen = order[-DIGITS_TEST_SIZE:] if split == "test" else order[:-DIGITS_TEST_SIZE]
    xs = jnp.asarray(images[chosen].reshape(len(chosen), 64).T[..., None], dtype)
    weight = jnp.zeros((64, len(chosen)), dtype).at[-1].set(1)
    value = jnp.broadcast_to(jnp.asarray(labels[chosen]), (64, len(chosen)))
    return xs, Targets(value, weight)


def batches(key: jax.Array, xs: jax.Array, targets, batch_size: int):
    """A random minibatch (without replacement within it) of a time-major dataset."""
    idx = jax.random.choice(key, xs.shape[1], (batch_size,), replace=False)
    take = lambda a: jnp.take(a, idx, axis=1)
    return take(xs), jax.tree.map(take, targets)


def accuracy(logits_last: jax.Array, labels: jax.Array) -> jax.Array:
    """Fraction of correct classes from the last step's logits."""
    return jnp.mean(jnp.argmax(logits_last, axis=-1) == labels)
