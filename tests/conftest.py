"""Test setup: 8 virtual CPU devices so every sharding path runs (XLA_FLAGS must be set before jax is imported).

On a GPU/TPU runner the flag only affects the host platform; tests use ``jax.devices()`` and work with any count.
"""

import os
import sys

# Bytecode caching on, whatever the environment says (this machine and its CI set PYTHONDONTWRITEBYTECODE=1, and uv
# installs without .pyc files): otherwise every xdist worker, colab kernel and child process compiles jax, numpy,
# scipy and flax from source again (measured: 6.4 CPU-s per `import jax, flax, optax, scipy, matplotlib,
# jaxmodels, merging, quant` without caches, 2.6 with them). The caches are gitignored __pycache__ folders.
sys.dont_write_bytecode = False
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
# NumPy/SciPy's OpenBLAS threads spin while waiting: with 2 xdist workers on 2 cores they burn the other worker's
# core (a 384x384 SVD: 0.45 CPU-s, 0.02 with one thread). The references' small matrices need no BLAS threads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# ``make test`` runs several xdist workers: on a GPU runner each would otherwise preallocate 75% of the device's
# memory at start-up and the second one would fail; allocate on demand so the workers share the accelerator.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

_flag = "--xla_force_host_platform_device_count=8"
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()


def _cpu_only() -> bool:
    """No accelerator will start (none installed and visible, or JAX is told to use the CPU): the tests then run on
    XLA:CPU. One detection for the notebooks and the tests: :func:`jaxmodels.runtime.accelerator_expected` (it
    imports jax without starting a backend, so the flags below still apply)."""
    from jaxmodels.runtime import accelerator_expected

    return accelerator_expected() is None


# On XLA:CPU the suite is compile-bound (tiny models, hundreds of distinct programs): LLVM's backend optimization
# level 0 cuts its CPU time by a fifth to a third. It changes code generation only, not the HLO or its float
# semantics (every exact test passes with it). GPU/TPU runners keep the default, so their kernels stay optimized.
if _cpu_only() and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def mesh():
    """All devices on the data axis."""
    from jaxmodels.sharding import make_mesh

    return make_mesh()


@pytest.fixture(scope="session")
def mesh_2d():
    """A data x model mesh (4x2 on 8 devices; degenerates gracefully on fewer)."""
    from jaxmodels.sharding import make_mesh

    n = jax.device_count()
    return make_mesh(model=2 if n % 2 == 0 else 1)


def pytest_runtest_setup(item):
    if item.get_closest_marker("accelerator") is not None and _cpu_only():
        pytest.skip("accelerator-only test (no GPU/TPU here)")


def pytest_collection_modifyitems(session, config, items):
    """Run the slowest test modules first, so that ``pytest -n 3`` (xdist, as ``make test``) does not end on one
    worker alone with a two-minute colab while the others idle.

    A module's weight is the sum of the durations recorded in ``tests/durations.json`` (seconds per test node id,
    from a ``--durations`` report; unknown tests count 0 and keep their place after the known ones). Modules stay
    contiguous and their tests keep their order, so module-scoped fixtures are still built once per worker.
    Refresh the file from a ``pytest --durations=60`` log with ``python scripts/test_durations.py LOG``.
    """
    import json
    from pathlib import Path

    path = Path(__file__).with_name("durations.json")
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    weight: dict[str, float] = {}
    for item in items:
        mod = item.nodeid.split("::", 1)[0]
        weight[mod] = weight.get(mod, 0.0) + float(known.get(item.nodeid, 0.0))
    first = {}
    for i, item in enumerate(items):
        first.setdefault(item.nodeid.split("::", 1)[0], i)
    items.sort(key=lambda it: (-weight[it.nodeid.split("::", 1)[0]], first[it.nodeid.split("::", 1)[0]]))
