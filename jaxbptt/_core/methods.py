"""The methods that compute a call's gradients, as values (`engine=` takes one, or a name):

- `ReverseScan()` (`engine="reverse"`): the hand-written reverse scan of `jaxbptt._engine`, whose
  sequential loop carries only the carry adjoint and whose parameter gradients are large matrix
  products per block. It honours every option.
- `Autodiff(checkpoint=False)` (`engine="autodiff"`): `jax.grad` through the option surrogates'
  `lax.scan`; with `checkpoint=True`, over `jax.checkpoint(step)`, storing each step's carry and
  recomputing its residuals. It has no memory policy, diagnostics, checked mode or cross-device
  norms, and refuses them with an error naming them.

Every method gives the same results for every option it honours (gradients equal up to float
rounding, and their own derivatives too); they differ in speed and memory only. `engine="auto"`
(the default) chooses per call with the cost model of `cost.py`.
"""

from __future__ import annotations

from typing import NamedTuple, Union

from . import autodiff, reverse_scan
from .call import Call, Result


class ReverseScan(NamedTuple):
    """The reverse-scan engine (`engine="reverse"`): every option, about half of `jax.grad`'s
    memory or less, and faster where the per-step work is small or the sequence long.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxbptt as jb
      >>> cell = jb.elman(4)
      >>> params = cell.init(jax.random.key(0), 2)
      >>> mse = lambda y, t: jnp.mean((y - t) ** 2)
      >>> f = jb.value_and_grad(cell.step, mse, engine=jb.ReverseScan(), remat=jb.Sqrt())
      >>> (loss, _), grads = f(params, cell.initial_carry(), jnp.ones((9, 2)), jnp.zeros((9, 4)))
      >>> grads["W_hh"].shape
      (4, 4)
    """

    def refused(self, used: dict) -> list:
        del used
        return []

    def value_and_grad(self, call: Call, store=None) -> Result:
        return reverse_scan.value_and_grad(call, reverse_scan.plan_of(call, store))

    def unroll(self, call: Call, probe=None, store=None):
        return reverse_scan.unroll(call, reverse_scan.plan_of(call, store), probe)


class Autodiff(NamedTuple):
    """JAX autodiff through the option surrogates' `lax.scan` (`engine="autodiff"`).

    Attributes:
      checkpoint: scan `jax.checkpoint(step)`: the backward pass stores each step's carry (and
        reads its input) only, and recomputes the step's residuals; memory of the carries alone.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxbptt as jb
      >>> cell = jb.gru(4)
      >>> params = cell.init(jax.random.key(0), 2)
      >>> mse = lambda y, t: jnp.mean((y - t) ** 2)
      >>> args = (params, cell.initial_carry(), jnp.ones((9, 2)), jnp.zeros((9, 4)))
      >>> _, g1 = jb.value_and_grad(cell.step, mse, truncation=3, engine=jb.Autodiff(checkpoint=True))(*args)
      >>> _, g2 = jb.value_and_grad(cell.step, mse, truncation=3, engine=jb.ReverseScan())(*args)
      >>> bool(jnp.allclose(g1["W_h"], g2["W_h"], rtol=1e-5, atol=1e-7))
      True
    """

    checkpoint: bool = False

    # What this method cannot do, and why.
    REFUSED = {"remat": "it has no memory policy other than checkpoint=True",
               "diagnostics": "it records no per-step adjoint norms", "probe": "it records no per-step adjoint norms",
               "check_finite": "it has no checked mode", "axis_name": "it reduces no norm across devices"}

    def refused(self, used: dict) -> list:
        return [name for name in self.REFUSED if name in used]

    def value_and_grad(self, call: Call, store=None) -> Result:
        del store
        return autodiff.value_and_grad(call, self.checkpoint)

    def unroll(self, call: Call, probe=None, store=None):
        del probe, store
        return autodiff.unroll(call, self.checkpoint)


Method = Union[ReverseScan, Autodiff]
NAMES = {"reverse": ReverseScan(), "autodiff": Autodiff()}


def check_engine(engine) -> None:
    if isinstance(engine, Autodiff) and not isinstance(engine.checkpoint, bool):
        raise TypeError(f"Autodiff(checkpoint=...) must be a bool; got checkpoint={engine.checkpoint!r}.")
    if isinstance(engine, (ReverseScan, Autodiff)):
        return
    if not isinstance(engine, str) or engine not in ("auto", *NAMES):
        raise ValueError(
            f"engine must be 'auto', 'reverse', 'autodiff', jaxbptt.ReverseScan() or jaxbptt.Autodiff(...); "
            f"got engine={engine!r}."
        )


def as_method(engine) -> Union[Method, str]:
    """The method an `engine` option names, or "auto"."""
    check_engine(engine)
    return NAMES.get(engine, engine) if isinstance(engine, str) else engine


def refuse(method, used: dict) -> None:
    """A ValueError naming every option in `used` (name -> value) that `method` does not honour."""
    if isinstance(method, str):
        return
    refused = method.refused(used)
    if refused:
        listing = ", ".join(f"{name}={used[name]!r}" for name in refused)
        reasons = "; ".join(f"{name}: {method.REFUSED[name]}" for name in refused)
        raise ValueError(
            f"engine={method!r} does not honour {listing} ({reasons}). Use engine='reverse' "
            f"(jaxbptt.ReverseScan(), which honours every option) or engine='auto'."
        )
