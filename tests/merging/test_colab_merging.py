"""The merging colab runs end to end in --quick mode, reports the table and the barriers, and asserts every paper claim
that holds at this scale (issue 13 item 13: the old test passed on "0/15 orderings reproduced")."""

import re

import pytest

from tests.colab_runner import run_colab


@pytest.mark.slow
def test_colab_merging_quick():
    out = run_colab("merging")
    assert "regmean++ (α=0.9)" in out and "twin-merging" in out and "adamerging (layer-wise)" in out
    barriers = {m.group(1).strip(): float(m.group(2))
                for m in re.finditer(r"^\s*(naive|weight matching|activation matching): loss barrier ([\d.-]+)", out,
                                     re.M)}
    assert barriers["weight matching"] < barriers["naive"]  # the colab asserts it too; check the printed numbers
    assert re.search(r"\d+/\d+ orderings reproduced", out)
    # the colab asserts every paper claim that holds at this scale (it exits non-zero otherwise); check the count
    m = re.search(r"asserted claims: (\d+)/(\d+) hold", out)
    assert m and m.group(1) == m.group(2) and int(m.group(2)) >= 11, m and m.group(0)
    for claim in ("Fisher merging > uniform average", "RegMean > Fisher merging", "Twin-Merging > best static merge",
                  "AdaMerging layer-wise > task-wise", "greedy soup >= uniform soup", "PLeaS (1.0) >= weight-matching"):
        assert re.search(r"✓\s+" + re.escape(claim) + r".*\[asserted\]", out), claim
