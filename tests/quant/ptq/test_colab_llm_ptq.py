"""Runs colabs/llm_ptq.py --quick (the tiny trained decoder of tests/data/tiny_decoder, perplexity on the test
split, 16 random calibration windows of the train split) and asserts the orderings the GPTQ / AWQ papers claim that
hold at this scale; the colab prints every claim with its numbers."""

import re

import pytest

from tests.colab_runner import run_colab


def _parse(out):
    rows = {}
    for m in re.finditer(r"^(W\d g\d+|-)\s+(\S+)\s+([\d.]+)\s+([\d.]+)\s+[\d.]+$", out, re.M):
        rows[(m.group(1), m.group(2))] = (float(m.group(3)), float(m.group(4)))
    return rows


@pytest.mark.slow
def test_colab_llm_ptq_quick_orderings():
    out = run_colab("llm_ptq", timeout=1200, optimized=True)
    rows = _parse(out)
    assert rows, out[-2000:]
    fp16 = rows[("-", "fp16")][0]
    rtn3, rtn4 = rows[("W3 g128", "rtn")], rows[("W4 g128", "rtn")]
    for m in ("gptq", "awq"):
        # GPTQ (Table 3) / AWQ (Table 4): below RTN at W3 g128 (measured quick: 12.68 / 12.76 vs 13.23), at no more
        # than AWQ's float16 input scales of extra bits (< 0.02 bpw)
        assert rows[("W3 g128", m)][0] < rtn3[0] - 0.2, (m, rows)
        assert rows[("W3 g128", m)][1] <= rtn3[1] + 0.02, (m, rows)
        # at W4 the gap is within the spread over calibration samples at this scale (measured 0.02-0.08 ppl on
        # 11.94, sign holding in the runs made): asserted only as not worse than RTN by more than 0.5 %
        assert rows[("W4 g128", m)][0] < 1.005 * rtn4[0], (m, rows)
    for m in ("rtn", "gptq", "awq"):
        assert rows[("W4 g128", m)][0] < rows[("W3 g128", m)][0], (m, rows)  # W4 < W3 per method
        assert rows[("W4 g128", m)][0] > fp16, (m, rows)  # quantization costs perplexity
    for name in ("GPTQ < RTN at W3 g128", "AWQ < RTN at W3 g128"):
        assert re.search(rf"^claim {re.escape(name)}: .* -> holds$", out, re.M), name
    assert re.search(r"^claim AWQ < GPTQ at W3 g128: .* -> (holds|does NOT hold at this scale)$", out, re.M)
