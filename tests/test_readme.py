"""The README's example runs as written (in a fresh process: the suite itself runs in float64)."""

import pathlib
import re
import subprocess
import sys

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has a python example"
    code = blocks[0] + "\nassert all(bool(jax.numpy.all(jax.numpy.isfinite(g))) for g in jax.tree.leaves(params))\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
