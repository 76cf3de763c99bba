"""Pictures of gradient flow (matplotlib, an optional extra: `pip install "jaxbptt[plot]"`)."""

from __future__ import annotations

from typing import Mapping, Optional

import numpy as np


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; no display needed
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError(
            "plot_gradient_flow needs matplotlib, an optional extra: pip install 'jaxbptt[plot]' (or matplotlib)."
        ) from err
    return plt


def plot_gradient_flow(
    runs: Mapping[str, object],
    path: str,
    *,
    title: Optional[str] = None,
    size: tuple[int, int] = (900, 500),
    dpi: int = 100,
) -> str:
    """Plot the norm of dL / d carry entering each step against the step, one line per run.

    Args:
      runs: label -> per-step adjoint norms, shape (T,) (a `jaxbptt.Diagnostics` is accepted too:
        its `adjoint_norm` is plotted). Runs may have different lengths.
      path: where to write the PNG.
      title: the figure title.
      size: (width, height) of the PNG in pixels.
      dpi: dots per inch of the saved figure.

    Returns:
      `path`.

    Raises:
      ImportError: matplotlib is not installed.
      ValueError: a run is not one-dimensional.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi)
    for label, norms in runs.items():
        norms = np.asarray(getattr(norms, "adjoint_norm", norms), dtype=np.float64)
        if norms.ndim != 1:
            raise ValueError(f"runs[{label!r}] must be per-step norms of shape (T,); got shape {norms.shape}.")
        shown = np.where(norms > 0, norms, np.nan)  # log scale: zeros (cut windows) are left blank
        ax.plot(np.arange(len(norms)), shown, label=label, linewidth=1.5)
    ax.set_yscale("log")
    ax.set_xlabel("time step t")
    ax.set_ylabel("||dL / d carry entering step t||")
    ax.set_title(title or "Gradient flow back through time")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
