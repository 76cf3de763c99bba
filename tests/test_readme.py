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


def test_readme_is_a_front_page_whose_links_resolve():
    """At most 200 lines, and every relative link or image points to a file of the repository (as
    GitHub resolves it; the site rewrites the `docs/` ones, see docs/_hooks.py)."""
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    relative = [link for link in links if not re.match(r"[a-z]+://|#|mailto:", link)]
    assert len(relative) >= 10, "the README links into the docs"
    missing = [link for link in relative if not (README.parent / link.split("#")[0]).exists()]
    assert missing == []
