"""Runs colabs/ptq.py --quick on the real all-MiniLM-L6-v2 and asserts the paper orderings on its table, each
against a control that stores no fewer bits per weight (the table's ``bpw``: real packed bytes)."""

import re

import pytest

from tests.colab_runner import run_colab


def _parse(out):
    rows = {}
    for m in re.finditer(r"^(W\d g\d+)\s+(\S+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+[\d.]+$", out, re.MULTILINE):
        rows[(m.group(1), m.group(2))] = (float(m.group(3)), float(m.group(4)), float(m.group(5)))
    return rows


@pytest.mark.slow
def test_colab_ptq_quick_orderings():
    out = run_colab("ptq", timeout=1800, optimized=True)  # run-bound (see run_colab)
    rows = _parse(out)
    assert rows, out[-2000:]
    for st in ("W4 g128", "W3 g128"):
        cos_rtn, rho_rtn, _ = rows[(st, "rtn")]
        for m in ("gptq-ao", "awq"):
            cos, rho, _ = rows[(st, m)]
            # AWQ paper Table: GPTQ act-order and AWQ beat RTN at W4/W3 g128; here in embedding cosine and in the
            # rank retention of pairwise similarities (their extra bits — the act-order permutation, AWQ's input
            # scales — are < 0.04 bpw; RTN g64 spends 0.16 more and stays below GPTQ's W3 row)
            assert cos > cos_rtn and rho > rho_rtn, (st, m, rows)
    assert rows[("W3 g64", "rtn")][2] > rows[("W3 g128", "gptq-ao")][2]
    assert rows[("W3 g128", "gptq-ao")][0] > rows[("W3 g64", "rtn")][0], rows
    # RSQ >= GPTQ (act-order) at W3; 0.002 slack: the quick run has 32 calibration sentences and the two differ
    # only in rotation + token weighting
    assert rows[("W3 g128", "rsq")][0] >= rows[("W3 g128", "gptq-ao")][0] - 0.002, rows
    # equal bits: mixed precision (3.5-bit budget) against a random ranking at the same budget, and RTN + LoRC
    # against RTN whose smaller groups spend no more bits than LoRC's factors
    mp, rnd = rows[("W3 g128", "mp-lim")], rows[("W3 g128", "mp-random")]
    assert abs(mp[2] - rnd[2]) < 1e-9, (mp, rnd)
    # Dumitru et al.: the LIM ranking beats a random ranking at the same budget (measured quick: cosine 0.911 vs
    # 0.874 at 3.688 bpw each)
    assert mp[0] > rnd[0] + 0.01 and mp[1] > rnd[1], (mp, rnd)
    # ZeroQuant-V2's LoRC (rank 8, INT8 factors, +0.25 bpw) does NOT beat RTN at g64 (fewer bits) at this scale
    # (measured quick: 0.841 vs 0.862): the colab says so with the numbers; only that it reports it is asserted
    lorc, g64 = rows[("W3 g128", "rtn+lorc")], rows[("W3 g64", "rtn")]
    assert g64[2] <= lorc[2], (lorc, g64)
    # ZeroQuant-V2: LoRC rank 8 improves the RTN W3 g128 weights it corrects (measured quick: 0.8287 -> 0.8407)
    assert lorc[0] > rows[("W3 g128", "rtn")][0] + 0.005, rows
    for name in ("LIM ranking > random ranking", "RTN g128 + LoRC r8 > RTN g64"):
        assert re.search(rf"^claim {re.escape(name)}.*-> (holds|does NOT hold at this scale)$", out, re.MULTILINE), name
    assert "loaded vs in-memory quantized" in out
