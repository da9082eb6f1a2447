"""jaxmodels.runtime: the platform is decided without starting a backend, and the CPU-only flags are set only on
CPU (a GPU/TPU runtime is left unchanged)."""

import pytest

from jaxmodels import runtime


def test_jax_platforms_decides(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert runtime.accelerator_expected() is None
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert runtime.accelerator_expected() == "gpu"
    monkeypatch.setenv("JAX_PLATFORMS", "tpu")
    assert runtime.accelerator_expected() == "tpu"


def test_setup_devices_sets_cpu_flags_once_and_nothing_on_an_accelerator(monkeypatch):
    import jax

    jax.devices()  # the test session's backend has started: the flags come too late, and it says so
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
    with pytest.warns(RuntimeWarning, match="already started"):
        assert runtime.setup_devices(4, fast_compile=True) == "cpu"
    import os

    flags = os.environ["XLA_FLAGS"]
    assert flags.startswith("--xla_dump_to=/tmp/x") and "device_count=4" in flags and "optimization_level=0" in flags
    assert runtime.setup_devices(8) == "cpu" and os.environ["XLA_FLAGS"] == flags  # kept, not duplicated
    monkeypatch.setenv("JAX_PLATFORMS", "tpu")
    monkeypatch.setenv("XLA_FLAGS", "")
    assert runtime.setup_devices(8, fast_compile=True) == "tpu" and os.environ["XLA_FLAGS"] == ""
    with pytest.raises(ValueError, match="n_cpu"):
        runtime.setup_devices(0)


def test_quick_mode(monkeypatch):
    monkeypatch.setattr("sys.argv", ["colab.py"])
    monkeypatch.delenv("WEIGHTLAB_QUICK", raising=False)
    assert not runtime.quick_mode()
    monkeypatch.setenv("WEIGHTLAB_QUICK", "1")
    assert runtime.quick_mode()
    monkeypatch.delenv("WEIGHTLAB_QUICK")
    monkeypatch.setattr("sys.argv", ["colab.py", "--quick"])
    assert runtime.quick_mode()
