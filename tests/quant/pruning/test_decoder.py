"""The pruning papers' claims at small scale on a real model: the trained tiny decoder of tests/data/tiny_decoder
(Llama family, hidden 128, 3 blocks, GQA; perplexity on the held-out test split of its corpus).

* Wanda / SparseGPT: at 50% unstructured and 2:4, SparseGPT < Wanda < magnitude in perplexity (the ordering of the
  papers' tables), every layer pruned to exactly its count, the 2:4 pattern along the inputs, reports and masks.
* Layer-adaptive sparsity (Xu et al., 2023): the DP allocation of per-layer magnitude sparsities beats uniform
  magnitude pruning at the same 50% overall sparsity, and the output distortions are additive.
"""


import numpy as np
import pytest

from jaxmodels.tree import flatten
from quant.pruning import (
    AllocationConfig, MagnitudeConfig, SparseGPTConfig, WandaConfig, joint_distortion, layer_adaptive_prune,
    prune_magnitude, prune_with_sparsities, sparsegpt, wanda,
)

from tests.tiny_decoder import SEQ, tiny_decoder


@pytest.fixture(scope="module")
def decoder():
    from quant.ptq.block_models import block_model

    model, params, windows, test = tiny_decoder(16)  # seed pinned (claims checked for 0, 1, 2)
    calib = {"input_ids": windows}
    snapshot = {k: np.array(v) for k, v in flatten(params).items()}
    return model, params, block_model(model), calib, test, snapshot


_PPL = {}


def _ppl(model, params, test, key=None):
    """Perplexity on the held-out windows (cached by ``key``: the tests share the uniform-magnitude model)."""
    from jaxmodels.perplexity import evaluate_perplexity

    if key is None or key not in _PPL:
        _PPL[key] = evaluate_perplexity(model, params, test, SEQ, batch_size=16, progress=False)
    return _PPL[key]


@pytest.fixture(scope="module")
def pruned(decoder):
    model, params, bm, calib, test, _ = decoder
    out = {}
    for pat in (None, "2:4"):
        out[pat, "magnitude"] = prune_magnitude(params, bm, None, MagnitudeConfig(0.5, pat))
        out[pat, "wanda"] = wanda(params, bm, calib, WandaConfig(0.5, pat))
        out[pat, "sparsegpt"] = sparsegpt(params, bm, calib, SparseGPTConfig(0.5, pat))
    return out


def test_sparsegpt_beats_wanda_beats_magnitude(decoder, pruned):
    model, params, _, _, test, _ = decoder
    ppl = {k: _ppl(model, q, test, key=k) for k, (q, _) in pruned.items()}
    # measured (dense 11.62 on these windows; 16 calibration windows of 128 tokens, seeds 0 / 1 / 2):
    #   50%:  magnitude 14.898, Wanda 14.249 / 14.334 / 14.390, SparseGPT 13.704 / 13.629 / 13.664
    #   2:4:  magnitude 19.712, Wanda 18.639 / 19.231 / 19.443, SparseGPT 16.456 / 16.421 / 16.763
    # seed 0 (pinned): Wanda 4.4% (50%) / 5.4% (2:4) below magnitude, SparseGPT 3.8% / 11.7% below Wanda
    for pat in (None, "2:4"):
        assert ppl[pat, "sparsegpt"] < 0.98 * ppl[pat, "wanda"], ppl
        assert ppl[pat, "wanda"] < 0.99 * ppl[pat, "magnitude"], ppl
    assert all(ppl["2:4", m] > ppl[None, m] for m in ("magnitude", "wanda", "sparsegpt"))  # 2:4 costs more


def test_exact_sparsity_pattern_and_reports(decoder, pruned):
    _, params, bm, _, _, snapshot = decoder
    for (pat, method), (q, rep) in pruned.items():
        fq = flatten(q)
        assert rep["method"] == method and rep["sparsity"] == 0.5
        assert len(rep["layers"]) == 7 * len(bm.block_paths)
        for path, r in rep["layers"].items():
            keep = np.asarray(r["mask"])
            w = np.asarray(fq[path])
            assert keep.shape == w.shape == snapshot[path].shape
            np.testing.assert_array_equal(w, np.asarray(r["weight"]))  # the params hold the record's weight
            assert (w[~keep] == 0).all()
            assert r["n_pruned"] == (~keep).sum() == keep.size // 2  # exactly ⌊n/2⌋ per layer (and per row)
            if pat == "2:4":
                assert r["pattern"] == "2:4"
                assert ((~keep.reshape(-1, 4, keep.shape[1])).sum(1) == 2).all()  # 4 consecutive inputs
            if method == "magnitude":
                np.testing.assert_array_equal(w[keep], snapshot[path][keep])  # no update of the kept weights
            else:
                assert 0 < r["error"] < 1  # relative output error on the calibration tokens
        assert flatten(rep["masks"]).keys() == rep["layers"].keys()
        for path, v in fq.items():
            if path not in rep["layers"]:
                np.testing.assert_array_equal(np.asarray(v), snapshot[path])
    for path, v in flatten(params).items():  # the input was not modified
        np.testing.assert_array_equal(np.asarray(v), snapshot[path])


def test_layer_adaptive_allocation_beats_uniform_and_is_additive(decoder, pruned):
    model, params, bm, calib, test, _ = decoder
    cal = {"input_ids": calib["input_ids"][:2, :64]}  # distortion curves on 2 calibration windows of 64 tokens
    q, rep = layer_adaptive_prune(params, bm, cal, AllocationConfig(0.5, levels=5))
    uniform = pruned[None, "magnitude"][0]  # MagnitudeConfig(0.5): every layer at 50%
    assert 0.5 - 1e-3 <= rep["sparsity"] <= 0.5
    # the curves' rank-based masks are magnitude's exact-count masks: all layers at 0.5 == MagnitudeConfig(0.5)
    same, _ = prune_with_sparsities(params, {p: 0.5 for p in rep["allocation"]})
    for p in rep["allocation"]:
        np.testing.assert_array_equal(np.asarray(flatten(same)[p]), np.asarray(flatten(uniform)[p]))
    sp = set(rep["allocation"].values())
    assert len(sp) > 1 and sp <= {0.0, 0.2, 0.4, 0.6, 0.8}
    ppl = {"dp": _ppl(model, q, test), "uniform": _ppl(model, uniform, test, key=(None, "magnitude"))}
    # measured (calibration seeds 0 / 1 / 2): DP 14.035 / 13.770 / 13.926, uniform 14.898 (global magnitude,
    # MagnitudeConfig(0.5, scope="global"), 17.032: off-line, its 344k-entry selection costs a compile): the
    # allocation is 5.8% (seed 0, pinned) below uniform per-layer magnitude at the same 50% (sparsity 0.49998)
    assert ppl["dp"] < 0.97 * ppl["uniform"], ppl
    # additivity: Σ_l D_l(s_l) predicts the distortion of pruning all layers together (measured ratio 0.957 / 1.193
    # / 1.170)
    joint = joint_distortion(params, q, bm, cal)
    assert 0.8 < rep["predicted_distortion"] / joint < 1.25, (rep["predicted_distortion"], joint)
    assert joint < joint_distortion(params, uniform, bm, cal)  # measured 1.517 vs 1.682
