"""The analysis colab (issue 18: colabs/analysis.py) runs end to end as a notebook in quick mode: NC1-NC4 over the
training of a digits MLP, weightwatcher's metrics and ESD fits, FARMS vs full-matrix α (i.i.d. kernels and the MLP
at init / trained), EL2N / GraNd data pruning vs random. It asserts, from the numbers the notebook writes to
``analysis_results.json``, the claims tests/jaxmodels/analysis/test_*.py assert, with their margins (the notebook
repeats their setups: conftest.py's collapse run, test_farms.py's i.i.d. kernels, test_data_diet.py's draws)."""

import json
import re

import numpy as np
import pytest

from tests.colab_runner import run_colab


@pytest.mark.slow
def test_colab_analysis_quick(tmp_path):
    out = run_colab("analysis", out=tmp_path)
    res = json.loads((tmp_path / "analysis_results.json").read_text())
    assert res["quick"] and res["seed"] == 0

    # neural collapse (test_neural_collapse.py): measured NC1 0.1116 -> 0.0162 from the first zero-error checkpoint
    # (step 100) to step 1500; NC2 max-angle 0.154 -> 0.108, ETF distance 0.563 -> 0.454; NC3 0.73 -> 0.35
    nc = res["neural_collapse"]
    first = next(i for i, c in enumerate(nc) if c["train_error"] == 0.0)
    early, late = nc[first], nc[-1]
    assert res["first_zero_error_step"] == early["step"] and late["train_error"] == 0.0
    assert late["step"] >= 3 * early["step"]
    assert late["nc1"] < early["nc1"] / 3.0
    assert late["nc2_maxangle_means"] < 0.95 * early["nc2_maxangle_means"]
    assert late["nc2_etf_distance_means"] < 0.95 * early["nc2_etf_distance_means"]
    assert late["nc2_equinorm_means"] < early["nc2_equinorm_means"]
    assert late["nc3_self_duality"] < early["nc3_self_duality"]
    assert late["nc4_ncc_mismatch"] <= early["nc4_ncc_mismatch"]

    # FARMS on i.i.d. kernels Q = 1, 2, 4, 4 (test_farms.py): measured full α 2.16 / 2.74 / 3.69 / 3.54, FARMS α
    # 2.09 / 2.14 / 2.08 / 2.10
    iid = res["farms"]["iid"]
    assert list(iid) == ["iid0_64x64/kernel", "iid1_64x128/kernel", "iid2_64x256/kernel", "iid3_256x64/kernel"]
    full_a = np.array([r["full_alpha"] for r in iid.values()])
    farms_a = np.array([r["farms_alpha"] for r in iid.values()])
    assert np.ptp(full_a) > 1.0 and np.ptp(farms_a) < 0.15, (full_a, farms_a)
    assert np.all(np.diff(full_a[:3]) > 0.4)
    # the MLP: at init FARMS α 2.09 / 2.08 / 2.10 vs the 64x10 classifier's full α 4.94; trained FARMS α 1.62 / 1.61
    # / 1.57 (every layer lower by >= 0.45 over the seeds 0-2)
    init, trained = res["farms"]["MLP init"], res["farms"]["MLP trained"]
    assert list(init) == list(trained) == ["Dense_0/kernel", "Dense_1/kernel", "Dense_2/kernel"]
    a0 = np.array([r["farms_alpha"] for r in init.values()])
    a1 = np.array([r["farms_alpha"] for r in trained.values()])
    full0 = np.array([r["full_alpha"] for r in init.values()])
    assert np.ptp(a0) < 0.3 and full0[2] > full0[:2].max() + 2.0, (a0, full0)
    assert np.all(a1 < a0 - 0.3), (a0, a1)
    # weightwatcher's KS-fit α of the 64x64 layers falls with training (measured 3.91, 5.56 -> 1.86, 1.60; seeds 1 /
    # 2: 8.25, 6.84 -> 1.67, 1.59 / 5.24, 3.02 -> 1.54, 1.57); its table has weightwatcher's columns
    ww0, ww1 = res["weightwatcher"]["MLP init"], res["weightwatcher"]["MLP trained"]
    for p in ("Dense_0/kernel", "Dense_1/kernel"):
        assert ww1[p]["alpha"] < ww0[p]["alpha"] - 0.5, (p, ww0[p]["alpha"], ww1[p]["alpha"])
    assert {"alpha", "alpha_weighted", "xmin", "num_pl_spikes", "stable_rank", "log_spectral_norm"} <= set(ww1[p])
    assert all(np.isfinite(v) for r in ww1.values() for v in r.values())
    # α -> layer-wise hyper-parameters (on the trained MLP in quick mode): ratios in range, 50% overall sparsity
    maps = res["alpha_maps"]
    assert maps["model"] == "MLP trained"
    assert all(0.5 - 1e-6 <= v <= 1.5 + 1e-6 for v in maps["lr_ratio"].values())
    assert all(0 < v < 1 for v in maps["pruning_ratio"].values())

    # data diet at 50% (test_data_diet.py, the same draws): measured full 0.9666, EL2N half 0.9710, random halves
    # 0.9621 / 0.9555 / 0.9599
    dd = res["data_diet"]
    rand = np.array([dd[f"random {j}"]["0.50"] for j in range(3)])
    top = dd["EL2N"]["0.50"]
    assert top > rand.mean() + 0.006, (top, rand)
    assert top >= rand.max(), (top, rand)
    assert top >= dd["full"] - 0.005, (top, dd["full"])
    # over the kept fractions 30 / 50 / 70%: EL2N 0.965 and GraNd 0.963 vs random 0.956 (seeds 1 / 2: 0.966 / 0.967,
    # 0.965 / 0.967 vs 0.954 / 0.955)
    fr = [f"{f:.2f}" for f in dd["fractions"]]
    rand_mean = np.mean([[dd[f"random {j}"][f] for f in fr] for j in range(3)])
    for score in ("EL2N", "GraNd"):
        assert np.mean([dd[score][f] for f in fr]) > rand_mean + 0.004, (score, dd[score], rand_mean)

    # the printed claims are the JSON's; every one holds in quick mode (measured for the seeds 0-2) but the
    # single-fraction data-diet comparisons (one run vs a mean of 3: EL2N at 70% kept is 0.9644 vs 0.9651)
    printed = re.findall(r"^claim (.+?): (-?[\d.]+) vs (-?[\d.]+) -> (holds|does NOT hold at this scale)$", out, re.M)
    assert len(printed) == len(res["claims"]) >= 25
    assert all((p[3] == "holds") == c["holds"] and p[0] == c["claim"] for p, c in zip(printed, res["claims"]))
    failing = [c["claim"] for c in res["claims"] if not c["holds"] and " > random at " not in c["claim"]]
    assert not failing, failing
    n_hold = sum(c["holds"] for c in res["claims"])
    assert re.search(rf"^claims holding: {n_hold}/{len(printed)}$", out, re.M)
    for name in ("neural_collapse.png", "esd_power_law.png", "farms_alpha.png", "data_diet.png"):
        assert (tmp_path / name).stat().st_size > 10_000, name
