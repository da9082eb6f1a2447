"""The pruning colab (issue 18: colabs/pruning.py) runs end to end as a notebook in quick mode on the trained tiny
decoder (tests/data/tiny_decoder): sparsity–perplexity curves of magnitude / Wanda / SparseGPT, 2:4, the
layer-adaptive DP allocation vs uniform at 50%. The orderings the papers claim that hold at this scale are asserted
from the numbers the notebook writes to ``pruning_results.json`` (the margins of tests/quant/pruning/
test_decoder.py, which measured them for the calibration seeds 0 / 1 / 2; the notebook pins 0)."""

import json
import re

import pytest

from tests.colab_runner import run_colab


@pytest.mark.slow
def test_colab_pruning_quick(tmp_path):
    out = run_colab("pruning", out=tmp_path)
    res = json.loads((tmp_path / "pruning_results.json").read_text())
    assert res["quick"] and res["test_windows"] == 16 and res["n_calibration"] == 16
    dense, sp = res["dense"], res["sparsities"]
    assert 11.0 < dense < 12.5, dense  # measured 11.622 on the 16 held-out windows
    assert sp == [0.5, 0.7]
    ppl = {m: [res["curves"][m][f"{s:.2f}"] for s in sp] for m in ("magnitude", "wanda", "sparsegpt")}
    for m, curve in ppl.items():
        # every method costs perplexity, more at 70% than at 50% (measured: SparseGPT 13.70 / 27.85, Wanda 14.25 /
        # 35.05, magnitude 14.90 / 32.21)
        assert dense < curve[0] < curve[1], (m, curve)
    # 50% unstructured (measured, seed 0: magnitude 14.898, Wanda 14.249, SparseGPT 13.704) and 2:4 (19.712,
    # 18.639, 16.456): SparseGPT < Wanda < magnitude, as in both papers' tables
    nm = res["nm"]["2:4"]
    for row in ({m: c[0] for m, c in ppl.items()}, nm):
        assert row["sparsegpt"] < 0.98 * row["wanda"], row
        assert row["wanda"] < 0.99 * row["magnitude"], row
    for m in ppl:
        assert nm[m] > ppl[m][0], m  # 2:4 costs more than 50% unstructured
    # SparseGPT's weight update leads at 70% too (measured 27.85 vs 35.05); Wanda < magnitude at 70% does NOT hold
    # here (35.05 vs 32.21): printed by the notebook, not asserted
    assert ppl["sparsegpt"][1] < 0.9 * ppl["wanda"][1]
    # layer-adaptive DP (Xu et al.): below uniform per-layer magnitude at the same 50% (measured 14.035 vs 14.898;
    # seeds 1 / 2 of test_decoder.py: 13.770 / 13.926), additive distortions (predicted 1.451, joint 1.517)
    la = res["layer_adaptive"]
    assert la["uniform_ppl"] == ppl["magnitude"][0]
    assert la["ppl"] < 0.97 * la["uniform_ppl"], la
    assert 0.5 - 1e-3 <= la["sparsity"] <= 0.5
    assert len(la["allocation"]) == 21 and len(set(la["allocation"].values())) > 1
    assert set(la["allocation"].values()) <= {0.0, 0.2, 0.4, 0.6, 0.8}
    assert 0.8 < la["predicted_distortion"] / la["joint_distortion"] < 1.25, la
    assert la["joint_distortion"] < la["uniform_joint_distortion"]
    # the printed claims are the JSON's, with their verdicts
    printed = re.findall(r"^claim (.+?): (-?[\d.]+) vs (-?[\d.]+) -> (holds|does NOT hold at this scale)$", out, re.M)
    assert len(printed) == len(res["claims"]) >= 15
    assert all((p[3] == "holds") == c["holds"] for p, c in zip(printed, res["claims"]))
    assert re.search(rf"^claims holding: {sum(c['holds'] for c in res['claims'])}/{len(res['claims'])}$", out, re.M)
    assert (tmp_path / "pruning_curves.png").stat().st_size > 10_000
