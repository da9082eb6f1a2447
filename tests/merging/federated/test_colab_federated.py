"""The federated colab (issue 19's deliverable) runs end to end as a notebook in quick mode, prints its results table
and checks the papers' claims from the numbers it computed; the claims that hold in quick mode (with a margin over
the seeds 0-2 measured off-line) are asserted here from the printed lines."""

import re

import pytest

from tests.colab_runner import run_colab

# (claim text prefix, minimum margin a - b). Measured in quick mode for SEED = 0 / 1 / 2 (the notebook pins 0); the
# claims left out are printed but not asserted (they do not hold, or not with a margin, at this scale: see the
# notebook's section 11).
ASSERTED = {
    # mean test accuracy over the 15 rounds: 0.840 vs 0.756 / 0.828 vs 0.737 / 0.828 vs 0.721
    "label skew slows FedAvg: mean accuracy over the rounds IID > Dirichlet(α=0.1)": 0.04,
    # 0.785 vs 0.756 / 0.802 vs 0.737 / 0.802 vs 0.721
    "label skew slows FedAvg: mean accuracy over the rounds Dirichlet(α=1.0) > Dirichlet(α=0.1)": 0.01,
    # 0.920 vs 0.866 / 0.898 vs 0.802 / 0.869 vs 0.791
    "FedAU > FedAvg under unknown heterogeneous participation, accuracy": 0.02,
    # ||θ - θ_full||: FedAU 0.97 vs FedAvg 1.75 / 1.20 vs 2.51 / 0.96 vs 2.10 (printed negated)
    "FedAU closer to full participation than FedAvg": 0.3,
    # mean per-layer cosine: 0.544 vs 0.384 / 0.556 vs 0.439 / 0.548 vs 0.423
    "DP-FedAvg per-layer clip keeps more signal per layer than flat": 0.05,
    # FedAvg 0.11 / 0.10 / 0.09 under the attack; median, trimmed mean, Krum, Flag 0.89-0.95
    "coordinate median > FedAvg under Byzantine clients": 0.5,
    "trimmed mean > FedAvg under Byzantine clients": 0.5,
    "Krum > FedAvg under Byzantine clients": 0.5,
    "Flag > FedAvg under Byzantine clients": 0.5,
    # 0.869 vs 0.675 / 0.875 vs 0.773 / 0.864 vs 0.655
    "CCVR > FedAvg on label-skewed clients, after 5 rounds": 0.05,
    # 0.835 vs 0.495 / 0.871 vs 0.469 / 0.841 vs 0.574
    "FedWon > FedAvg+BN on multi-domain digits": 0.15,
    # 0.835 vs 0.732 / 0.871 vs 0.776 / 0.841 vs 0.783
    "FedWon > FedBN on multi-domain digits": 0.02,
    # 0.732 vs 0.495 / 0.776 vs 0.469 / 0.783 vs 0.574
    "FedBN > FedAvg+BN on multi-domain digits": 0.1,
    # first-layer variance 0.0206 -> min 0.0054 / 0.0055 / 0.0053 without correction, >= 0.0207 with it
    "gossip: plain averaging shrinks the weight variance": 0.005,
    "gossip: the correction keeps it": 0.005,
    # mean node accuracy 0.920 vs 0.888 / 0.932 vs 0.916 / 0.915 vs 0.900
    "gossip: variance correction > plain averaging, accuracy": 0.01,
    # seed 0 in quick mode: 0.835 vs 0.775 (the module test's setting, seeds 0 / 1 / 2: +0.04 / +0.12 / +0.07)
    "FedTiny > magnitude pruning at init at 90% sparsity": 0.02,
    # seed 0: mean OOD accuracy over α in (0, 1) 0.732 vs 0.587 (module test, seeds 0-2: +0.19 / +0.08 / +0.03)
    "BANG > plain fine-tune along the WiSE-FT path": 0.02,
    # seed 0: 0.37 vs 0.67 (module test: 0.17 vs 0.68 / 0.54 vs 0.73 / 0.50 vs 0.63)
    "BANG's fine-tune is less overconfident out of distribution": 0.1,
}
# Printed, not asserted: FedAvg final accuracy IID > Dir(0.1) (holds by 0.004 / 0.040 / 0.060: seed 0's margin is
# two test digits), Flag > Krum (+0.025 / +0.033 / -0.004), CCVR after 15 rounds (+0.002 / +0.027 / +0.029) and
# DP per-layer > flat clip in accuracy (does not hold: -0.076 / -0.033 / -0.085).


@pytest.mark.slow
def test_colab_federated_quick(tmp_path):
    out = run_colab("federated", out=tmp_path)
    # the results table: a header and one row per run, every section represented
    assert re.search(r"^\s*method\s+partition\s+accuracy\s+rounds\s*$", out, re.M), out[-3000:]
    for method in ("FedAvg", "FedAU (softmax regression)", "DP-FedAvg (per-layer clip)", "Flag (r=3), 2 Byzantine",
                   "FedAvg + CCVR", "FedWon", "FedBN", "gossip + variance correction", "FedTiny (10% density)",
                   "WiSE-FT mean over α, BANG"):
        assert re.search(r"^\s*" + re.escape(method) + r"\s+\S", out, re.M), method
    claims = {m.group(1): (float(m.group(2)), float(m.group(3)), m.group(4) == "holds")
              for m in re.finditer(r"^claim (.+?): (-?[\d.]+) vs (-?[\d.]+) -> (holds|does NOT hold at this scale)$",
                                   out, re.M)}
    m = re.search(r"claims holding: (\d+)/(\d+)", out)
    assert m and int(m.group(2)) == len(claims) >= 20, (m and m.group(0), len(claims))
    for prefix, margin in ASSERTED.items():
        hits = [k for k in claims if k.startswith(prefix)]
        assert len(hits) == 1, (prefix, hits)
        a, b, holds = claims[hits[0]]
        assert holds and a > b + margin, (hits[0], a, b, margin)
    assert {p.name for p in tmp_path.glob("*.png")} >= {"fedavg_label_skew.png", "fedau.png", "byzantine.png",
                                                       "gossip_variance.png", "federated_accuracy_per_round.png",
                                                       "bang_wise_ft.png"}
