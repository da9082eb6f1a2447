"""The distribution as a user gets it: ``python -m build`` makes a wheel and an sdist (offline, from the checkout),
each installs on its own and passes a smoke test (import, one merge, one quantization, the version) with the
checkout out of the way; the version comes from one place."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SMOKE = r"""
import sys, jax, jax.numpy as jnp, numpy as np
import jaxmodels, merging, quant
from merging.ties import ties
from quant.formats import IntFormat, round_trip
target = sys.argv[1]
for m in (jaxmodels, merging, quant):
    assert m.__file__.startswith(target), (m.__name__, m.__file__)  # the installed copy, not the checkout
base = {"w": jnp.zeros((4, 4))}
models = [{"w": jnp.full((4, 4), v)} for v in (1.0, 2.0)]
out = ties(base, models, density=1.0)
# TIES at density 1 with one sign everywhere: the (mergekit-default normalized) mean of the task vectors
np.testing.assert_allclose(out["w"], 1.5)
x = jnp.linspace(-1, 1, 256).reshape(128, 2)  # groups along axis 0 (the kernel's input axis)
err = float(jnp.abs(round_trip(x, IntFormat(bits=8, granularity="group", group_size=128)) - x).max())
assert err < 1 / 127, err
print("ok", jaxmodels.__version__)
"""


def _version() -> str:
    import ast

    tree = ast.parse((ROOT / "jaxmodels" / "__init__.py").read_text())
    return next(n.value.value for n in tree.body if isinstance(n, ast.Assign)
                and getattr(n.targets[0], "id", "") == "__version__")


def test_version_has_one_source():
    text = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in text and 'version = {attr = "jaxmodels.__version__"}' in text
    import jaxmodels
    import merging
    import quant

    assert jaxmodels.__version__ == merging.__version__ == quant.__version__ == _version()
    assert f"## {_version()}" in (ROOT / "CHANGELOG.md").read_text()


@pytest.mark.slow
def test_wheel_and_sdist_build_install_and_pass_a_smoke_test(tmp_path):
    dist = tmp_path / "dist"
    r = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(ROOT)],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    wheel = next(dist.glob("weightlab-*.whl"))
    sdist = next(dist.glob("weightlab-*.tar.gz"))
    assert wheel.name.startswith(f"weightlab-{_version()}-") and sdist.name == f"weightlab-{_version()}.tar.gz"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for name, artifact in (("wheel", wheel), ("sdist", sdist)):
        target = tmp_path / name
        r = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                            "--target", str(target), str(artifact)], capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        assert not (target / "tests").exists()  # the package, not the test-suite
        r = subprocess.run([sys.executable, "-c", SMOKE, str(target)], capture_output=True, text=True,
                           cwd=tmp_path, env=dict(env, PYTHONPATH=str(target), JAX_PLATFORMS="cpu"))
        assert r.returncode == 0 and r.stdout.startswith("ok " + _version()), (name, r.stdout, r.stderr[-3000:])
