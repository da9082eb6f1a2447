"""The PEFT colab (full vs LoRA vs DoRA vs Bone vs EVA vs QLoRA on the pre-trained tiny decoder, prose -> Python
source) runs end to end in --quick mode, prints its tables, and the claims that hold at this scale hold."""

import re

import pytest

from tests.colab_runner import run_colab

ARMS = ("full", "lora", "dora", "bone", "eva", "qlora")


@pytest.mark.slow
def test_colab_peft_quick():
    out = run_colab("peft", optimized=True)
    rows = {m.group(1): m for m in re.finditer(r"^\| (\w+) \| ([0-9.]+) \| ([0-9.]+) \| (\d+) \| ([0-9.]+) \| (\d+) \|",
                                               out, re.M)}
    assert set(rows) >= {"base", *ARMS}, out
    code = {a: float(rows[a].group(2)) for a in rows}
    prose = {a: float(rows[a].group(3)) for a in rows}
    pct = {a: float(rows[a].group(5)) for a in rows}
    opt = {a: int(rows[a].group(6)) for a in rows}
    for arm in ARMS:
        # every arm adapts to the new domain: the quick budget takes the held-out code perplexity from 58.0 to 25-32
        assert code[arm] < 0.75 * code["base"], (arm, code)
    for arm in ARMS[1:]:
        # r=8 on 128-wide kernels: r (d_in + d_out) / (d_in d_out) = 12.5% of each adapted kernel (see the colab)
        assert 0 < pct[arm] < 12 and opt[arm] < 0.12 * opt["full"], (arm, pct[arm], opt[arm])
    assert pct["full"] == pytest.approx(100.0)
    # QLoRA's NF4 base costs little quality (quick run: 30.2 vs 30.4); 5% is the colab's stated claim
    assert code["qlora"] <= 1.05 * code["lora"]
    # DoRA's magnitude/direction split is at least as good as LoRA at the same rank (quick run: 29.1 vs 30.4)
    assert code["dora"] <= 1.05 * code["lora"]
    # full fine-tuning moves every weight: it forgets more of the prose than the low-rank update
    # (quick run: 18.6 vs 17.9)
    assert prose["full"] > prose["lora"] > prose["base"]
    nf4 = re.search(r"^\| QLoRA NF4 \+ double-quantized scales \| (\d+) \| ([0-9.]+) \|", out, re.M)
    assert nf4 and float(nf4.group(2)) <= 0.3  # 4.127 bits per weight vs bf16's 16 -> 0.26x
    assert "claim" in out and "EVA ranks per layer" in out
