"""Unusual but valid inputs and option combinations: each must give the exact answer or a clear
error naming the argument."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbptt as jb
from steps import mse

CELL = jb.elman(4)


def _args(T=10, dtype=jnp.float64):
    params = jax.tree.map(lambda a: a.astype(dtype), CELL.init(jax.random.key(0), 3))
    xs = jax.random.normal(jax.random.key(1), (T, 2, 3), dtype)
    targets = 0.1 * jax.random.normal(jax.random.key(2), (T, 2, 4), dtype)
    return params, jnp.zeros((2, 4), dtype), xs, targets


def _close(a, b, rtol=1e-10):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=1e-12)


@pytest.mark.parametrize("k", [jnp.int64(2**63 - 1), jnp.int32(2**31 - 1)])
def test_traced_truncation_at_least_length_is_exact(k):
    args = _args()
    exact = jb.value_and_grad(CELL.step, mse, argnums=(0, 1, 2))(*args)[1]
    f = jax.jit(lambda k: jb.value_and_grad(CELL.step, mse, argnums=(0, 1, 2), truncation=k)(*args)[1])
    _close(f(k), exact)
    final_grad = jax.jit(jax.grad(lambda p, k: jnp.sum(jb.unroll(CELL.step, p, args[1], args[2], truncation=k)[1])))
    _close(final_grad(args[0], k), jax.grad(lambda p: jnp.sum(jb.unroll(CELL.step, p, args[1], args[2])[1]))(args[0]))
