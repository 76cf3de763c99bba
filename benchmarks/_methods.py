"""The compared methods. Each binds to a problem (the same step, loss and data; peers bring their
own parameters for the same architecture) and says what its gradients are compared with."""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax

import jaxbptt as jb

from ._problems import Problem, as_float64, mse

BASELINE = "jax.grad"


class Bound(NamedTuple):
    """A method bound to one problem.

    `run(*args) -> (loss, grads)`: a jit-able JAX function (`kind="jax"`), or for `kind="torch"` a
    Python callable of no arguments running one forward and backward pass and returning the
    gradients. `oracle() -> grads` gives the float64 gradients the method's are compared with (None:
    the method changes the gradient, so no comparison)."""

    run: Callable
    args: tuple = ()
    kind: str = "jax"
    oracle: Optional[Callable] = None


def autodiff(step: Callable, loss_fn: Callable = mse) -> Callable:
    """`jax.value_and_grad` through `lax.scan` of the same step and loss: the baseline."""

    def loss(params, carry, xs, targets):
        def body(c, inputs):
            c, y = step(params, c, inputs[0])
            return c, loss_fn(y, inputs[1])

        _, losses = lax.scan(body, carry, (xs, targets))
        return jnp.sum(losses)

    return jax.value_and_grad(loss)


def problem_args(problem: Problem) -> tuple:
    return problem.params, problem.carry, problem.xs, problem.targets


def oracle(problem: Problem) -> Callable:
    """Float64 gradients of plain autodiff through lax.scan of the problem (cached per problem)."""
    cache = {}

    def grads():
        if "g" not in cache:
            p = as_float64(problem)
            cache["g"] = jax.jit(autodiff(p.step, p.loss))(*problem_args(p))[1]
        return cache["g"]

    return grads


def _jaxbptt(exact: bool = True, **options) -> Callable:
    def build(problem: Problem, reference) -> Bound:
        f = jb.value_and_grad(problem.step, problem.loss, **options)

        def run(*args):
            (loss, *_), grads = f(*args)  # (loss, final_carry) or, with diagnostics, (loss, final_carry, diag)
            return loss, grads

        return Bound(run, problem_args(problem), oracle=reference if exact else None)

    return build


def _autodiff(checkpoint: bool = False) -> Callable:
    def build(problem: Problem, reference) -> Bound:
        step = jax.checkpoint(problem.step) if checkpoint else problem.step
        return Bound(autodiff(step, problem.loss), problem_args(problem), oracle=reference)

    return build


def _bfloat16(build_inner: Callable) -> Callable:
    """The method run in mixed precision: bfloat16 params and inputs, float32 carry and targets;
    its gradients are still compared with the float32 problem's float64 oracle."""

    def build(problem: Problem, reference) -> Bound:
        inner = build_inner(problem, reference)
        cast = lambda tree: jax.tree.map(lambda a: a.astype(jnp.bfloat16), tree)
        run = lambda params, carry, xs, targets: inner.run(cast(params), carry, cast(xs), targets)
        return inner._replace(run=run)

    return build


def _peer(name: str) -> Callable:
    def build(problem: Problem, reference) -> Bound:
        from . import _peers

        return getattr(_peers, name)(problem)

    return build


METHODS: dict[str, Callable[[Problem, Callable], Bound]] = {
    BASELINE: _autodiff(),
    "jaxbptt": _jaxbptt(),
    "jax.checkpoint": _autodiff(checkpoint=True),
    "flax": _peer("flax_rnn"),
    "equinox": _peer("equinox_scan"),
    "torch": _peer("torch_rnn"),
    "k=10": _jaxbptt(False, truncation=10),
    "(5,10)": _jaxbptt(False, truncation=(5, 10)),
    "(10,40)": _jaxbptt(False, truncation=(10, 40)),
    "clip+diag": _jaxbptt(False, clip_norm=1.0, diagnostics=True),
    "remat=sqrt": _jaxbptt(remat="sqrt"),
    "remat=64": _jaxbptt(remat=64),
    "binomial(16)": _jaxbptt(remat=jb.Binomial(16)),
    "invert": _jaxbptt(remat=jb.Invert()),
    "jax.grad bf16": _bfloat16(_autodiff()),
    "jaxbptt bf16": _bfloat16(_jaxbptt()),
    **{f"jaxbptt u={u}": _jaxbptt(unroll=u) for u in (2, 4, 8)},
}
