"""Runs colabs/ptq.py --quick on the real all-MiniLM-L6-v2 and asserts the paper orderings on its table."""

import re

import pytest

from tests.colab_runner import run_colab


def _parse(out):
    rows = {}
    for m in re.finditer(r"^(W\d g\d+)\s+(\S+)\s+([\d.]+)\s+([\d.]+)\s+[\d.]+$", out, re.M):
        rows[(m.group(1), m.group(2))] = (float(m.group(3)), float(m.group(4)))
    return rows


@pytest.mark.slow
def test_colab_ptq_quick_orderings():
    out = run_colab("ptq", timeout=1800)
    rows = _parse(out)
    assert rows, out[-2000:]
    for st in ("W4 g128", "W3 g128"):
        cos_rtn, rho_rtn = rows[(st, "rtn")]
        for m in ("gptq-ao", "awq"):
            cos, rho = rows[(st, m)]
            # AWQ paper Table: GPTQ act-order and AWQ beat RTN at W4/W3 g128; here in embedding cosine and
            # in the rank retention of pairwise similarities
            assert cos > cos_rtn and rho > rho_rtn, (st, m, rows)
    # RSQ >= GPTQ (act-order) at W3; 0.002 slack: the quick run has 32 calibration sentences and the two differ
    # only in rotation + token weighting
    assert rows[("W3 g128", "rsq")][0] >= rows[("W3 g128", "gptq-ao")][0] - 0.002, rows
    # LoRC (rank 8 on RTN's error) and layer-wise mixed precision (LIM ranking, +0.5 bit) improve on RTN at W3
    # (measured quick: RTN 0.829, RTN+LoRC 0.843, 3.5-bit LIM 0.911)
    assert rows[("W3 g128", "rtn+lorc")][0] > rows[("W3 g128", "rtn")][0] + 0.005, rows
    assert rows[("W3 g128", "mp-lim")][0] > rows[("W3 g128", "rtn")][0] + 0.03, rows
    assert "loaded vs in-memory quantized" in out
