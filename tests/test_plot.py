"""The gradient-flow plot and the demo command."""

import struct
import sys

import numpy as np
import pytest

import jaxbptt as jb
from examples import gradflow


def _png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_plot_writes_png_of_requested_size(tmp_path):
    path = str(tmp_path / "flow.png")
    runs = {"decay": 0.9 ** np.arange(50)[::-1], "diag": jb.Diagnostics(np.ones(30), np.zeros(30, bool))}
    assert jb.plot_gradient_flow(runs, path, size=(640, 360)) == path
    assert _png_size(path) == (640, 360)


def test_plot_rejects_bad_runs(tmp_path):
    with pytest.raises(ValueError, match=r"runs\['x'\] must be per-step norms of shape \(T,\)"):
        jb.plot_gradient_flow({"x": np.ones((3, 2))}, str(tmp_path / "x.png"))


def test_plot_without_matplotlib(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install 'jaxbptt\[plot\]'"):
        jb.plot_gradient_flow({"x": np.ones(3)}, str(tmp_path / "x.png"))


def test_demo_shows_the_textbook_picture(tmp_path, capsys):
    out = str(tmp_path / "demo.png")
    results = gradflow.main(["--steps", "60", "--hidden", "32", "--out", out])
    assert _png_size(out) == (900, 500)
    rate = {label: gradflow.rate_per_step(norms) for label, norms in results.items()}
    assert rate["tanh, orthogonal W"] < 0.9  # vanishing
    assert rate["tanh, large normal W (x3)"] > 1.1  # exploding
    assert 0.95 < rate["IRNN (ReLU, identity W)"] < 1.05
    clipped = results["tanh, large normal W, clip_norm=1"]
    # after the first step back, each pre-clip norm is at most one step's growth above the cap
    assert float(np.max(clipped[:-1])) < 10.0 < float(np.max(results["tanh, large normal W (x3)"]))
    assert "rate/step" in capsys.readouterr().out
