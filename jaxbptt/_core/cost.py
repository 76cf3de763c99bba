"""The cost model behind `engine="auto"`: which method computes a call, and what it stores.

It reads the step at trace time (`StepCost`: its FLOPs per step and how many of them are matrix
products with a parameter, which the engine folds into one product per block; the bytes per step
that `jax.grad` through `lax.scan` would store, that the engine would store, and that the carry
and input take; the batch rows and the length) and picks, in this order:

1. An option only the engine honours (a memory policy, diagnostics, the checked mode, cross-device
   norms), or Williams-Peng windows (which autodiff can only re-run window by window): the engine.
2. Short or narrow sequences at large batches (`prefers_autodiff`): autodiff, for built-in cells
   and any step alike: the engine's fixed cost per block outweighs what it saves per step.
3. A built-in cell or combinator (a hand-derived kernel) otherwise: the engine.
4. Any other step whose per-step work is mostly matrix products with parameters: the engine,
   whose parameter gradients are then large products per block; it stores each step's residuals
   unless they are not much leaner than autodiff's, in which case it stores block-start carries
   only and recomputes each block (what is cheaper to recompute than to store).
5. Any other step: autodiff; over `jax.checkpoint(step)` when what autodiff would store dwarfs the
   carry and input and no longer fits in cache, where re-running the step costs less than moving
   its residuals through memory (an inner `jax.grad`, a normalisation).

Every threshold below says where it was measured; all ran on 2 CPU cores, float32, side by side
with `jax.grad` through `lax.scan` (`python -m benchmarks`, its core, grid and user-step sections).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import numpy as np
from jax.extend import core as jex_core

from .._engine import reverse
from .._engine.kernel import Step, kernel_for, varying_outputs
from .._engine.split import split_step
from .call import Call
from .methods import Autodiff, ReverseScan

# Rule 2 (grid suite: T in {25, 50, 100}, B in {8, 64}, H in {32, 128}, and T=60, B=32, H=32;
# built-in cells): at batch 8 the engine took 0.48-0.97x autodiff's time at every T and H; at
# batch 64 and T <= 50, 0.95-1.35x (blocks of at most 8 steps, where the per-block epilogue
# dominates); at batch 64 and T=100, 0.84-0.97x with H=128 but 1.05-1.11x with H=32 on a quiet
# machine (1.15-1.3x under load, the same at T=300): a narrow carry gives each step too little work
# for the one matrix product per step the engine saves. Runs on a loaded machine vary by more than
# these margins: re-measure before moving a threshold.
_AUTODIFF_MIN_ROWS = 32
_AUTODIFF_MAX_LENGTH = 64
_AUTODIFF_MAX_WIDTH = 64
# Rule 4: the share of a step's FLOPs in matrix products with a parameter from which the engine's
# folded parameter products pay (user steps: the two-layer tanh step, 0.79-0.92x autodiff's time,
# and the leaky integrator, 0.54-0.63x, are over 0.9; the hypergradient step, whose parameters only
# scale an inner gradient, is 0 and took 1.4-1.8x on the engine).
_ENGINE_MATMUL_SHARE = 0.5
# Rule 4's storage: the engine stores every step's residuals when they take at most this fraction
# of what autodiff stores per step (two-layer step: 0.34x autodiff's memory storing, and 1.2x its
# time recomputing; leaky integrator: 0.95x storing, 0.26x recomputing at 1.17x the storing time,
# still 0.63x autodiff's).
_ENGINE_STORE_FRACTION = 0.5
# Rule 5: checkpoint when autodiff's residuals are at least this many times the carry and input per
# step, the whole sequence's exceed this many bytes, and re-running the step costs at most this many
# FLOPs per residual byte saved (hypergradient step, B=32, D=8, H=16: 7.9x, 1.7 FLOPs per byte, and
# jax.checkpoint took 1.08-1.09x jax.grad's time at T=100 (1.2 MB of residuals, in cache) but
# 0.55-0.97x at T=1000 (12 MB); layer-normed GRU, T=100, B=32, H=64: 12x and 16 MB but 8.9 FLOPs per
# byte, and 1.02-1.09x).
_CHECKPOINT_RESIDUAL_RATIO = 4
_CHECKPOINT_MIN_BYTES = 4 << 20
_CHECKPOINT_MAX_FLOPS_PER_BYTE = 4

# Options only the reverse scan honours.
ENGINE_ONLY = ("remat", "diagnostics", "probe", "check_finite", "axis_name")


def prefers_autodiff(length: int, rows: int, elements: int) -> bool:
    """Rule 2: True where autodiff through `lax.scan` is measured faster than the engine.

    `rows` is the batch size of one step and `elements` its carry's size (B x H, 2 B x H for an
    LSTM)."""
    if rows < _AUTODIFF_MIN_ROWS:
        return False
    return length <= _AUTODIFF_MAX_LENGTH or elements <= _AUTODIFF_MAX_WIDTH * rows


class StepCost(NamedTuple):
    """What one step costs, read from its jaxpr at trace time."""

    flops: int  # per step, forward
    matmul_flops: int  # of which matrix products reading a parameter (sites the engine folds)
    autodiff_bytes: int  # residual bytes per step that jax.grad through lax.scan stores
    engine_bytes: int  # bytes per step that the engine stores under remat=None (outs and residuals)
    carry_bytes: int
    input_bytes: int


def _nbytes(avals) -> int:
    return sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in avals)


def _flops(eqn) -> int:
    """FLOPs of one equation: 2 M N K for a matrix product, one per output element otherwise."""
    out = sum(math.prod(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape"))
    if eqn.primitive.name == "dot_general":
        (contract, _), _ = eqn.params["dimension_numbers"]
        return 2 * out * math.prod(eqn.invars[0].aval.shape[d] for d in contract)
    return out


def _total_flops(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        inner = list(jex_core.jaxprs_in_params(eqn.params))
        total += sum(_total_flops(j) for j in inner) if inner else _flops(eqn)
    return total


def _autodiff_bytes(step, params, carry, x) -> int:
    """Bytes of the per-step residuals of the step's VJP that vary with the carry or the input
    (`lax.scan`'s partial evaluation keeps the invariant ones once)."""

    def residuals(p, c, x_):
        _, vjp = jax.vjp(lambda c_, x__: step(p, c_, x__), c, x_)
        return jax.tree.leaves(vjp)

    closed = jax.make_jaxpr(residuals)(params, carry, x)
    flags = [False] * len(jax.tree.leaves(params)) + [True] * len(jax.tree.leaves((carry, x)))
    return _nbytes(v.aval for v, var in zip(closed.jaxpr.outvars, varying_outputs(closed, flags)) if var)


def step_cost(call: Call) -> StepCost:
    step, params, carry, x = call.step, call.params, call.carry, call.x
    x_one = jax.tree.map(lambda a: a[:1], call.xs)
    kernel = kernel_for(step, params, carry, x)
    u = jax.eval_shape(lambda p, xs: jax.tree.map(lambda a: a[0], kernel.project(p, xs)), params, x_one)
    consts = jax.eval_shape(kernel.prepare, params, carry, u)
    _, out, res = jax.eval_shape(kernel.forward, params, consts, carry, u)
    split = split_step(lambda p, c, x_: tuple(step(p, c, x_)), params, carry, x)
    matmul = sum(_flops(s.eqn) for s in split.sites if s.eqn.primitive.name == "dot_general")
    return StepCost(_total_flops(split.jaxpr), matmul, _autodiff_bytes(step, params, carry, x),
                    _nbytes(jax.tree.leaves((out, res))), _nbytes(jax.tree.leaves(carry)), _nbytes(jax.tree.leaves(x)))


def choose(call: Call, used: dict):
    """`(method, store)` for the call (see the module docstring); `store` is the engine's choice
    under `remat=None` (None: the policy's default)."""
    if any(name in used for name in ENGINE_ONLY) or call.opts.truncation.windows:
        return ReverseScan(), None
    rows, elements = reverse.rows_per_step(call.carry), reverse.carry_elements(call.carry)
    if prefers_autodiff(call.length, rows, elements):
        return Autodiff(checkpoint=_checkpoint_pays(call)), None
    if isinstance(call.step, Step):
        return ReverseScan(), None
    cost = step_cost(call)
    if cost.matmul_flops >= _ENGINE_MATMUL_SHARE * cost.flops:
        return ReverseScan(), cost.engine_bytes <= _ENGINE_STORE_FRACTION * cost.autodiff_bytes
    return Autodiff(checkpoint=_checkpoint_pays(call, cost)), None


def _checkpoint_pays(call: Call, cost: StepCost = None) -> bool:
    """Rule 5."""
    if cost is None:
        if isinstance(call.step, Step):  # the built-in cells' residuals are a few times their carry
            return False
        cost = step_cost(call)
    return (cost.autodiff_bytes >= _CHECKPOINT_RESIDUAL_RATIO * (cost.carry_bytes + cost.input_bytes)
            and cost.autodiff_bytes * call.length >= _CHECKPOINT_MIN_BYTES
            and cost.flops <= _CHECKPOINT_MAX_FLOPS_PER_BYTE * cost.autodiff_bytes)
