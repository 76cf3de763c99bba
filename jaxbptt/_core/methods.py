"""Which exact path computes a gradient: the reverse-scan engine or plain autodiff.

Both paths give the same gradients for every option they accept (up to float rounding):
- `"reverse"`: the reverse-scan engine (`_reverse.py`), whose sequential loop carries only the
  carry adjoint and whose parameter gradients are large matrix products per block;
- `"autodiff"`: `jax.grad` through the option surrogates of `_reference.py` (a plain `lax.scan`
  with `stop_gradient` for truncation and a clipping identity for `clip_norm`).

`engine="auto"` (the default) chooses at trace time with `prefers_autodiff`, a small cost model
of where the engine's fixed per-block cost (an epilogue of output cotangents and parameter products
for every block) outweighs what it saves per step: short sequences, or narrow carries, at large
batches. It only ever picks autodiff where that keeps every requested feature: no memory policy
(autodiff stores every step), no diagnostics, no checked mode, no cross-device norms, exact BPTT or
chunked truncation by a static length, no clipping.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._engine.kernel import Step

if TYPE_CHECKING:
    from .._core.options import Options

ENGINES = ("auto", "reverse", "autodiff")


def check_engine(engine, *, remat=None, diagnostics=False, check_finite=False, axis_name=None, probe=None) -> None:
    """Trace-time validation of the `engine` option and of what the autodiff path cannot do."""
    if not isinstance(engine, str) or engine not in ENGINES:
        raise ValueError(f"engine must be one of {list(ENGINES)}; got engine={engine!r}.")
    if engine != "autodiff":
        return
    unsupported = {"remat": remat is not None, "diagnostics": bool(diagnostics), "check_finite": bool(check_finite),
                   "axis_name": axis_name is not None, "probe": probe is not None}
    named = [name for name, used in unsupported.items() if used]
    if named:
        raise ValueError(
            f"engine='autodiff' (jax.grad through lax.scan) stores every step and has no diagnostics, checked "
            f"mode or cross-device norms; got {', '.join(named)} set. Use engine='reverse' or 'auto' with "
            f"these options."
        )


# The cost model's thresholds: batch rows per step from which the engine's per-block epilogue
# (residual copies, output cotangents, parameter products of every block; it grows with the batch)
# outweighs the per-step work it saves; the longest sequence where that holds at any width; and the
# carry width (elements per batch row) up to which it holds at any length. The engine keeps at least
# 8 blocks per sequence for memory, so up to 64 steps a block holds at most 8 steps.
_AUTODIFF_MIN_ROWS = 32
_AUTODIFF_MAX_LENGTH = 64
_AUTODIFF_MAX_WIDTH = 64


def prefers_autodiff(length: int, rows: int, elements: int) -> bool:
    """The cost model: True where autodiff through `lax.scan` is measured faster than the engine.

    `rows` is the batch size of one step and `elements` its carry's size (B x H, 2 B x H for an
    LSTM). Measured side by side on 2 CPU cores, float32, with the built-in cells, D=16, a 10-unit
    readout and per-step MSE (the `grid` suite of `python -m benchmarks`: T in {25, 50, 100}, B in
    {8, 64}, H in {32, 128}; and T=60, B=32, H=32):
    - at batch 8 the engine took 0.48-0.97x autodiff's time at every T and H;
    - at batch 64 and T <= 50 it took 0.95-1.35x (blocks of at most 8 steps, where the per-block
      epilogue dominates);
    - at batch 64 and T=100 it took 0.84-0.97x with H=128 but 1.05-1.11x with H=32 on a quiet
      machine (1.15-1.3x under load, and the same at T=300): a narrow carry gives each step too
      little work for the one matrix product per step the engine saves.
    Runs on a loaded machine vary by more than these margins: re-measure before moving a threshold.
    """
    if rows < _AUTODIFF_MIN_ROWS:
        return False
    return length <= _AUTODIFF_MAX_LENGTH or elements <= _AUTODIFF_MAX_WIDTH * rows


def use_autodiff(step, length: int, rows: int, elements: int, opts: "Options") -> bool:
    """Whether this call, with its resolved options, takes the autodiff path."""
    if opts.engine != "auto":
        return opts.engine == "autodiff"
    plain = (opts.remat is None and opts.clip_norm is None and opts.static_truncation and not opts.diagnostics
             and not opts.check_finite and opts.axis_name is None)
    return plain and isinstance(step, Step) and prefers_autodiff(length, rows, elements)
