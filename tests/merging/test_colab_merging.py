"""The merging colab runs end to end in --quick mode and reports the table, the barriers and the claim checks."""

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
