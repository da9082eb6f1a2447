import re

import pytest

from tests.colab_runner import run_colab


@pytest.mark.slow
def test_norms_colab_quick(tmp_path):
    out = run_colab("norms", out=tmp_path)
    assert (tmp_path / "norms_loss_curves.png").stat().st_size > 1000
    assert (tmp_path / "norms_hidden_norm.png").stat().st_size > 1000
    rows = re.findall(r"^\s*(\d+)\s+(Post-LN|Pre-LN|Peri-LN|LN-Scaling)\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)\s+"
                      r"([0-9.]+)\s+([0-9.]+)", out, re.M)
    assert len(rows) == 8, out  # 4 placements x 2 depths
    vocab_loss = 4.48  # ln(88 characters of argparse.py): the loss of a uniform predictor
    for depth, variant, train, val, h1, hl, growth in rows:
        assert float(val) < vocab_loss - 1.0, (variant, depth, val)  # every variant learns something in 40 steps
    growth = {(int(r[0]), r[1]): float(r[6]) for r in rows}
    # Post-LN renormalizes after every block, so its hidden norm stays ~sqrt(d) at every layer; Pre-LN's residual
    # stream grows with depth (the Curse-of-Depth observation), more at depth 4 than at depth 2.
    assert growth[4, "Post-LN"] < 1.5
    assert growth[4, "Pre-LN"] > growth[2, "Pre-LN"] > 1.0
    assert "LN-Scaling damps Pre-LN growth: True" in out
