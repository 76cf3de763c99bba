"""Smoke tests of the main job: every suite of `python -m benchmarks`, run through the same code path
as the README's command with `--smoke` (every configuration at a tiny size), exits 0 and writes a
well-formed report in which every method of every section either ran or says why it was skipped.
All suites share one process; the README's command is checked to start.
No timing assertions: speed is measured by the benchmarks, not by tests."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest

from benchmarks._harness import model_gflop
from benchmarks._problems import MODELS, OUTPUT_SIZE, Problem, make_problem
from benchmarks._suites import SUITE_EXTRAS, SUITES, smoke_configs

ROOT = pathlib.Path(__file__).resolve().parents[1]
ROW_KEYS = {"device", "dtype", "cell", "T", "B", "D", "H", "method", "time_ms", "p25_ms", "p75_ms", "repeats",
            "compile_s", "temp_bytes", "grad_rel_err", "gflops", "peak_fraction"}


# One compilation cache for the benchmark processes: the smoke sizes repeat across suites.
ENV = dict(os.environ, PYTHONPATH=str(ROOT), JAX_COMPILATION_CACHE_DIR=str(ROOT / ".jax_cache"),
           JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.05", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def _run(argv):
    result = subprocess.run([sys.executable, *argv], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_every_suite_runs(tmp_path):
    """Every suite, the default one (the README's main job) first, one after another in one process
    (tests/benchmark_smoke.py, through the same `main` as `python -m benchmarks`), so the sections the
    suites share are measured once."""
    suites = ["default", *sorted(set(SUITES) - {"default"})]
    stdout = _run([str(ROOT / "tests" / "benchmark_smoke.py"), str(tmp_path), *suites])
    assert stdout.split() == [word for suite in suites for word in (suite, "ok")]
    for suite in suites:
        report = json.loads((tmp_path / f"{suite}.json").read_text())
        check_report(suite, report, (tmp_path / f"{suite}.txt").read_text())


def test_the_readme_command_starts():
    """`python -m benchmarks` is the module the test above runs through `main`; its entry point parses
    the same arguments."""
    assert "--suite" in _run(["-m", "benchmarks", "--help"])


def check_report(suite, report, stdout):
    assert report["suite"] == suite and report["peak_gflops"] > 0
    sections = {s["name"]: s for s in report["sections"]}
    assert list(sections) == [s.name for s in SUITES[suite]]
    for expected in SUITES[suite]:
        section = sections[expected.name]
        configs = {(r["cell"], r["T"], r["B"], r["D"], r["H"]) for r in section["rows"]}
        assert configs == set(smoke_configs(expected.configs))
        for method in expected.methods:  # each method ran on every configuration, or says why not
            ran = [r for r in section["rows"] if r["method"] == method]
            assert len(ran) == len(configs) or method in section["skipped"], (expected.name, method)
        assert all(isinstance(why, str) for why in section["skipped"].values())
        assert section["ratios"] and section["summary"]
        for row in section["rows"]:
            assert ROW_KEYS <= row.keys()
            assert row["time_ms"] > 0 and row["repeats"] >= 3
            if row["method"] != "torch":  # XLA temp memory; PyTorch on a CPU reports none
                assert row["temp_bytes"] is not None
            if row["grad_rel_err"] is not None and "bf16" not in row["method"]:
                assert row["grad_rel_err"] < 1e-4, row
        if section["baseline"] != "jaxbptt":  # exact BPTT's gradients are compared in every such section
            assert all(r["grad_rel_err"] is not None for r in section["rows"] if r["method"] == "jaxbptt"), expected.name
    for name in SUITE_EXTRAS.get(suite, ()):
        assert report[name], name
    assert all(f"Ratios to {s.baseline}" in stdout for s in SUITES[suite])


def test_each_model_has_its_own_flop_count():
    """The FLOP rate and peak fraction of a row count its own model's matrix products: a mask adds
    none, a second layer its own (the problems' arrays are abstract: nothing is computed)."""
    T, B, D, H, O = 4, 2, 3, 5, OUTPUT_SIZE

    def gflop(name):
        with jax.numpy_rank_promotion("allow"):  # the benchmarks' own step broadcasts its biases
            arrays = jax.eval_shape(lambda: make_problem(name, T, B, D, H)[6:10])  # params, carry, xs, targets
            return model_gflop(Problem(name, T, B, D, H, MODELS[name](H).step, *arrays))

    per_step = lambda flop: 3 * T * B * 2 * flop / 1e9  # forward and backward, over T steps of B rows
    for name, gates in {"elman": 1, "lstm": 4, "gru": 3}.items():
        layer = (D + H) * gates * H
        assert gflop(name) == pytest.approx(per_step(layer + H * O))
        assert gflop(f"masked-{name}") == pytest.approx(per_step(layer + H * O))
        assert gflop(f"stacked2-{name}") == pytest.approx(per_step(layer + 2 * H * gates * H + H * O))
    assert gflop("custom") == pytest.approx(per_step((D + H) * H + 2 * H * H + H * O))
