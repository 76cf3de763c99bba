"""The compared methods: each maps a problem to a jit-able `f(params, carry, xs, targets) -> (value, grads)`
with gradients with respect to the parameters."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

import jaxbptt as jb

from ._problems import Problem, mse

BASELINE = "jax.grad"


def autodiff(step: Callable, loss_fn: Callable = mse) -> Callable:
    """`jax.value_and_grad` through `lax.scan` of the same step and loss: the baseline."""

    def loss(params, carry, xs, targets):
        def body(c, inputs):
            c, y = step(params, c, inputs[0])
            return c, loss_fn(y, inputs[1])

        _, losses = lax.scan(body, carry, (xs, targets))
        return jnp.sum(losses)

    return jax.value_and_grad(loss)


def _jaxbptt(**options) -> Callable:
    def build(problem: Problem) -> Callable:
        f = jb.value_and_grad(problem.step, mse, **options)
        return lambda *args: (lambda out: (out[0][0], out[1:] if len(out[0]) > 2 else out[1]))(f(*args))

    return build


def _bfloat16(build_inner: Callable) -> Callable:
    """The method run in mixed precision: bfloat16 params and inputs, float32 carry and targets."""

    def build(problem: Problem) -> Callable:
        f = build_inner(problem)
        cast = lambda tree: jax.tree.map(lambda a: a.astype(jnp.bfloat16), tree)
        return lambda params, carry, xs, targets: f(cast(params), carry, cast(xs), targets)

    return build


METHODS: dict[str, Callable[[Problem], Callable]] = {
    BASELINE: lambda problem: autodiff(problem.step),
    "jaxbptt": _jaxbptt(),
    "k=10": _jaxbptt(truncation=10),
    "(5,10)": _jaxbptt(truncation=(5, 10)),
    "(10,40)": _jaxbptt(truncation=(10, 40)),
    "clip+diag": _jaxbptt(clip_norm=1.0, diagnostics=True),
    "remat=sqrt": _jaxbptt(remat="sqrt"),
    "remat=64": _jaxbptt(remat=64),
    "binomial(16)": _jaxbptt(remat=jb.Binomial(16)),
    "jax.grad bf16": _bfloat16(lambda problem: autodiff(problem.step)),
    "jaxbptt bf16": _bfloat16(_jaxbptt()),
}
GRADIENT_CHANGING = {"k=10", "(5,10)", "(10,40)", "clip+diag"}  # not compared with the exact oracle
