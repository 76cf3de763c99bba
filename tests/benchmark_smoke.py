"""Runs several benchmark suites with `--smoke` in one interpreter (tests/test_benchmarks.py starts it),
so they share one start-up and one set of compiled programs:

    python tests/benchmark_smoke.py OUT_DIR SUITE [SUITE ...]

writes OUT_DIR/SUITE.json (the `--json` report) and OUT_DIR/SUITE.txt (what the suite printed) for
each suite, through the same `main` as `python -m benchmarks --suite SUITE --smoke --json PATH`.
"""

import contextlib
import io
import pathlib
import sys

from benchmarks.__main__ import main

out_dir = pathlib.Path(sys.argv[1])
for suite in sys.argv[2:]:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        main(["--suite", suite, "--smoke", "--json", str(out_dir / f"{suite}.json")])
    (out_dir / f"{suite}.txt").write_text(printed.getvalue())
    print(f"{suite} ok", flush=True)
