"""merging.lora_merge.add_weighted_adapter against PEFT 0.21.2's add_weighted_adapter on the same two LoRAs
(tests/data/peft/{m0,m1}, weights [0.7, -0.5]; fixture: scripts/make_peft_reference.py).

Factor-wise methods and cat: PEFT's factors (transposed) within 1e-6 (float32 elementwise ops; ties and
magnitude_prune are deterministic on these tie-free random factors). SVD methods: the rank-3 delta s·A·B within 1e-5
(singular vectors are defined up to sign, the product is not). DARE at density 1 (PEFT's Bernoulli mask comes
from torch's generator and cannot be reproduced; merging.sparsify.bernoulli is tested against given masks).
"""

from pathlib import Path

import numpy as np
import pytest

from jaxmodels import adapters as ad
from merging.lora_merge import COMBINATIONS, add_weighted_adapter

DATA = Path(__file__).resolve().parents[1] / "data" / "peft"


@pytest.fixture(scope="module")
def inputs():
    m0, c0 = ad.load_adapter(DATA / "m0")
    m1, c1 = ad.load_adapter(DATA / "m1")
    return [m0, m1], [c0, c1], np.load(DATA / "weighted.npz")


@pytest.mark.parametrize("comb", COMBINATIONS)
def test_matches_peft(inputs, comb):
    adapters, configs, ref = inputs
    density = 1.0 if comb.startswith("dare") else (0.5 if comb not in ("linear", "cat", "svd") else None)
    out, cfg = add_weighted_adapter(adapters, configs, [0.7, -0.5], comb, density=density,
                                    svd_rank=3 if comb.endswith("svd") else None)
    mods = ad.adapter_modules(out)
    assert len(mods) == 4
    for m, leaves in mods.items():
        hf = ad.hf_module_name(m, "llama")
        a_t, b_t = ref[f"{comb}/{hf}/lora_A"], ref[f"{comb}/{hf}/lora_B"]
        s_ref = float(ref[f"{comb}/{hf}/scaling"])
        s = ad.scaling(cfg, m, leaves["lora_A"].shape[-1])
        assert s == pytest.approx(s_ref)
        a, b = np.asarray(leaves["lora_A"]), np.asarray(leaves["lora_B"])
        if comb.endswith("svd"):
            np.testing.assert_allclose(s * a @ b, s_ref * (b_t @ a_t).T, atol=1e-5, rtol=0, err_msg=m)
        else:
            np.testing.assert_allclose(a, a_t.T, atol=1e-6, rtol=0, err_msg=m)
            np.testing.assert_allclose(b, b_t.T, atol=1e-6, rtol=0, err_msg=m)


def test_bad_input(inputs):
    adapters, configs, _ = inputs
    with pytest.raises(ValueError, match="combination_type"):
        add_weighted_adapter(adapters, configs, [1, 1], "mean")
    with pytest.raises(ValueError, match="density"):
        add_weighted_adapter(adapters, configs, [1, 1], "ties")
    with pytest.raises(ValueError, match="key"):
        add_weighted_adapter(adapters, configs, [1, 1], "dare_linear", density=0.5)
