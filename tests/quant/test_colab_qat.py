"""The QAT colab runs end to end in --quick mode and reports every number the issue asks for."""

import re

import pytest

from tests.colab_runner import run_colab


@pytest.mark.slow
def test_colab_qat_quick():
    out = run_colab("qat", optimized=True)
    fp = float(re.search(r"\| ViT fp32 accuracy \| ([0-9.]+) \|", out).group(1))
    assert fp > 0.85  # a 2-block ViT reaches ~0.93 on digits in the quick budget
    for bits in (4, 3, 2):
        for method in ("LSQ", "StatsQ\\+QKR\\+CGA"):
            m = re.search(rf"\| W{bits} {method} acc / oscillations \(total, last phase\) \| "
                          rf"([0-9.]+) / (\d+), (\d+) \|", out)
            assert m, (bits, method)
            # QAT starts from the float model: low-bit accuracy stays well above chance (0.1)
            assert float(m.group(1)) > 0.5
            assert int(m.group(2)) >= int(m.group(3)) >= 0
    fp_bpc = float(re.search(r"\| GPT fp32 val bits/char \| ([0-9.]+) \|", out).group(1))
    bit_bpc = float(re.search(r"\| GPT BitNet b1.58 val bits/char \| ([0-9.]+) \|", out).group(1))
    # both learn (uniform over the ~90-character vocabulary is 6.5 bits; ~3.6 after the quick budget)
    assert fp_bpc < 5.0 and bit_bpc < 5.5
    m = re.search(r"\| GPT bytes fp32 -> packed ternary \| (\d+) -> (\d+) \|", out)
    assert int(m.group(2)) < int(m.group(1)) / 4
