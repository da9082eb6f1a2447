"""Checks that only make sense on a GPU or TPU runner (marker ``accelerator``; skipped on CPU): the suite really ran on
the accelerator, the mesh spans every real device, and float32 matmuls at ``precision=HIGHEST`` are exact enough for
the tests that pin them (on GPU the default float32 matmul may use TF32, on TPU bf16 passes)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytestmark = pytest.mark.accelerator


def test_suite_runs_on_the_accelerator_and_the_mesh_spans_its_devices():
    from jaxmodels.sharding import make_mesh

    assert jax.default_backend() in ("gpu", "tpu"), jax.devices()
    mesh = make_mesh()
    assert mesh.devices.size == jax.device_count() and all(d.platform != "cpu" for d in mesh.devices.flat)


def test_highest_precision_float32_matmul_matches_float64():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((512, 512), np.float32), rng.standard_normal((512, 512), np.float32)
    ref = a.astype(np.float64) @ b.astype(np.float64)
    out = np.asarray(jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST), np.float64)
    # float32 accumulation over 512 terms: relative error ~ sqrt(512) * 6e-8 ~ 1.4e-6 of the row norm
    np.testing.assert_allclose(out, ref, atol=2e-4 * np.abs(ref).max(), rtol=0)
