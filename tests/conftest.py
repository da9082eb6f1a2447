"""Test setup: 8 virtual CPU devices so every sharding path runs (XLA_FLAGS must be set before jax is imported).

On a GPU/TPU runner the flag only affects the host platform; tests use ``jax.devices()`` and work with any count.
"""

import os

_flag = "--xla_force_host_platform_device_count=8"
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

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
