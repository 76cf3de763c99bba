"""The cost model behind `engine="auto"`: which method, and what to store, for one call."""

from __future__ import annotations

from .._engine import reverse
from .._engine.kernel import Step
from .call import Call
from .methods import Autodiff, ReverseScan

_AUTODIFF_MIN_ROWS = 32
_AUTODIFF_MAX_LENGTH = 64
_AUTODIFF_MAX_WIDTH = 64

# Options only the reverse scan honours.
ENGINE_ONLY = ("remat", "diagnostics", "probe", "check_finite", "axis_name")


def prefers_autodiff(length: int, rows: int, elements: int) -> bool:
    if rows < _AUTODIFF_MIN_ROWS:
        return False
    return length <= _AUTODIFF_MAX_LENGTH or elements <= _AUTODIFF_MAX_WIDTH * rows


def choose(call: Call, used: dict):
    """`(method, store)` for the call: `store` is the engine's choice under `remat=None`."""
    if any(name in used for name in ENGINE_ONLY) or call.opts.truncation.windows:
        return ReverseScan(), None
    rows, elements = reverse.rows_per_step(call.carry), reverse.carry_elements(call.carry)
    if isinstance(call.step, Step) and call.opts.clip_norm is None and prefers_autodiff(call.length, rows, elements):
        return Autodiff(), None
    return ReverseScan(), None
