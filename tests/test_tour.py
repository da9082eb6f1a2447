import re

import pytest

from tests.colab_runner import run_colab


@pytest.mark.slow
def test_tour_quick_trains_restores_and_reports_accuracy():
    out = run_colab("tour")
    acc = float(re.search(r"MLP digits test accuracy \(restored\)\s+([0-9.]+)", out).group(1))
    assert acc > 0.9
    assert "restored == trained: True" in out
    assert "8 cpu devices" in out or "gpu" in out or "tpu" in out
    # MiniLM section: paraphrases score higher than unrelated pairs.
    cos = [float(c) for c in re.findall(r"MiniLM cosine ([+-][0-9.]+)", out)]
    assert len(cos) == 4 and min(cos[:2]) > max(cos[2:]) + 0.3, cos
    # merging section: every data-free merge of the three digit-subset experts beats the best single expert on the
    # average over tasks (each expert forgets the other digits: ~0.35-0.45 average; merges measured 0.69-0.93)
    merge_acc = dict(re.findall(r"merge avg acc: (.+?)\s+([0-9.]+)\n", out))
    best = float(merge_acc.pop("best single expert"))
    assert len(merge_acc) == 4 and min(float(v) for v in merge_acc.values()) > best + 0.15, (merge_acc, best)
