"""The character-level language model example runs end to end on a tiny setting."""

import math

from examples import char_lm


def test_char_lm_smoke(capsys):
    result = char_lm.main(["--chars", "6000", "--hidden", "8", "--layers", "1", "--embed", "4", "--batch", "2",
                           "--k1", "4", "--k2", "6", "--steps", "48", "--chunks-per-call", "4", "--sample", "20"])
    out = capsys.readouterr().out
    assert "bits per character on held-out text" in out and "unigram baseline" in out
    assert math.isfinite(result["test_bpc"]) and 0 < result["unigram_bpc"] < math.log2(200)
    assert len(result["sample"]) == len("The ") + 20
