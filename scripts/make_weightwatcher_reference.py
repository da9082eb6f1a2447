"""Regenerate tests/jaxmodels/analysis/data/: weightwatcher's eigenvalues and heavy-tailed metrics on a few small
random / heavy-tailed matrices (the reference that tests/jaxmodels/analysis/test_spectral.py compares
``jaxmodels.analysis.spectral`` against).

Run OUTSIDE the project venv, in a throwaway venv with weightwatcher (never install it into .venv)::

    python3 -m venv /tmp/wwenv && /tmp/wwenv/bin/pip install weightwatcher==0.7.7 numpy
    /tmp/wwenv/bin/python scripts/make_weightwatcher_reference.py

weightwatcher reads a plain ``{"name.weight": ndarray}`` dict (its "pystatedict" framework). Its reader compares each
array's type against ``torch.Tensor`` and imports torch for that; torch is NOT installed here (it is not needed for
the numerics: without torch weightwatcher computes every SVD with numpy/scipy, its "accurate" path). So after
``import weightwatcher`` (which must see no torch, to pick that path) this script registers a stand-in module
``torch`` holding only an empty ``Tensor`` class; no torch code exists or runs. Versions go to VERSIONS.json.

Matrices are given in torch layout (``weight[out, in]``, conv ``[out, in, kh, kw]``); the test passes the Flax
layout (``kernel = weight.T``, conv ``weight.transpose(2, 3, 1, 0)``). ``analyze()`` runs with its defaults
(pool=True, conv2d_norm=True, no fix_fingers, the "ww" power-law package), ``randomize=False, mp_fit=False``.
"""

import json
import sys
import types
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "tests" / "jaxmodels" / "analysis" / "data"
METRICS = ("alpha", "alpha_weighted", "D", "xmin", "sigma", "num_pl_spikes", "num_evals", "norm", "log_norm",
           "spectral_norm", "log_spectral_norm", "stable_rank", "log_alpha_norm", "lambda_max")


def matrices(rng: np.random.Generator) -> dict[str, np.ndarray]:
    m = {}
    m["gauss_100x50"] = rng.standard_normal((100, 50))                          # Marchenko-Pastur, Q = 2
    m["gauss_64x64"] = rng.standard_normal((64, 64)) / 8.0                      # Q = 1 (small eigenvalues near 0)
    m["student_t_120x40"] = rng.standard_t(3.0, (120, 40)) / 10.0               # heavy-tailed entries
    u, v = rng.standard_normal((80, 3)), rng.standard_normal((3, 80))
    m["spiked_80x80"] = rng.standard_normal((80, 80)) + 0.8 * u @ v             # bulk + 3 spikes
    d = np.arange(1, 61, dtype=np.float64) ** -0.75
    m["powerlaw_120x60"] = rng.standard_normal((120, 60)) * d[None, :]          # power-law column scales
    m["smalln_30x12"] = rng.standard_normal((30, 12))                           # 12 < 20 eigenvalues: small-N fit
    m["conv_16x8x3x3"] = rng.standard_normal((16, 8, 3, 3)) * 0.3               # Conv2D, 9 slices of 16 x 8
    return {k: v.astype(np.float32) for k, v in m.items()}


def main():
    import scipy
    import weightwatcher as ww  # imported before the stand-in: weightwatcher must see no torch

    if "torch" not in sys.modules:
        stub = types.ModuleType("torch")
        stub.Tensor = type("Tensor", (), {})
        stub.__version__ = "absent (stand-in module: only the name torch.Tensor, no code)"
        sys.modules["torch"] = stub

    rng = np.random.default_rng(20250618)
    mats = matrices(rng)
    state = {f"{k}.weight": v for k, v in mats.items()}
    watcher = ww.WeightWatcher(model=state)
    details = watcher.analyze(randomize=False, mp_fit=False, plot=False)
    out = {}
    for i, name in enumerate(mats):
        row = details[details["name"] == name].iloc[0]
        out[f"{name}/weight"] = mats[name]
        out[f"{name}/evals"] = np.asarray(watcher.get_ESD(layer=int(row["layer_id"])), np.float64)
        for k in METRICS:
            out[f"{name}/{k}"] = np.float64(row[k])
        print(f"{name:18s} alpha={row['alpha']:.4f} xmin={row['xmin']:.4f} D={row['D']:.4f} "
              f"n={int(row['num_evals'])} spikes={int(row['num_pl_spikes'])}")
    OUT.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT / "weightwatcher_reference.npz", **out)
    versions = {"weightwatcher": ww.__version__, "numpy": np.__version__, "scipy": scipy.__version__,
                "python": sys.version.split()[0],
                "torch": "not installed; a stand-in module named torch with an empty Tensor class lets "
                         "weightwatcher's dict reader run (all SVDs by numpy/scipy)",
                "analyze": "randomize=False, mp_fit=False, plot=False; other arguments default"}
    (OUT / "VERSIONS.json").write_text(json.dumps(versions, indent=1) + "\n")


if __name__ == "__main__":
    main()
