"""Type aliases shared by the public signatures."""

from typing import Any, Callable, TypeVar

import jax

PyTree = Any
Params = PyTree
Carry = TypeVar("Carry")
X = TypeVar("X")
Y = TypeVar("Y")

# step(params, carry, x) -> (carry, y)
StepFn = Callable[[Params, Carry, X], tuple[Carry, Y]]
# loss_fn(y_t, target_t) -> scalar
LossFn = Callable[[Y, PyTree], jax.Array]
