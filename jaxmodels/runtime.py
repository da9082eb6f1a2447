"""Where the code runs: accelerator detection and the CPU-only virtual-device setup shared by the notebooks, the
tests and the benches.

XLA reads its flags when the first backend starts (the first ``jax.devices()`` or computation), not at ``import
jax``: :func:`setup_devices` must run before that. On a GPU or TPU runtime it changes nothing, so the same notebook
runs on the real devices (every notebook builds its mesh over ``jax.devices()``); on CPU it asks XLA for ``n``
virtual host devices so the sharded code paths really run.
"""

from __future__ import annotations

import importlib.util
import glob
import os
import sys
import warnings

__all__ = ["ACCELERATOR_PLUGINS", "accelerator_expected", "quick_mode", "setup_devices"]

#: JAX's accelerator plugins (CUDA 12/13, ROCm, TPU): when one is installed *and* its device is visible, JAX starts
#: on it by default.
ACCELERATOR_PLUGINS = {"gpu": ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin"),
                       "tpu": ("libtpu",)}
_DEVICE_NODES = {"gpu": ("/dev/nvidia0", "/dev/kfd"), "tpu": ("/dev/accel*", "/dev/vfio/[0-9]*")}
_TPU_ENV = ("TPU_NAME", "COLAB_TPU_ADDR", "TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES")


def accelerator_expected() -> str | None:
    """``"gpu"`` / ``"tpu"`` when JAX will start on an accelerator, ``None`` for CPU — decided without starting a
    backend: ``JAX_PLATFORMS`` when set (``"cpu"`` → None), else an installed plugin whose device is visible (a
    device node, or for TPU one of the TPU VM / Colab environment variables)."""
    forced = os.environ.get("JAX_PLATFORMS", "").strip().lower()
    if forced:
        first = forced.split(",")[0]
        return None if first == "cpu" else ("gpu" if first in ("cuda", "rocm", "gpu") else first)
    for kind, plugins in ACCELERATOR_PLUGINS.items():
        if not any(importlib.util.find_spec(p) for p in plugins):
            continue
        if any(glob.glob(pattern) for pattern in _DEVICE_NODES[kind]) or (
                kind == "tpu" and any(v in os.environ for v in _TPU_ENV)):
            return kind
    return None


def quick_mode() -> bool:
    """A notebook's quick mode: ``--quick`` on the command line (a script) or ``WEIGHTLAB_QUICK=1`` in the
    environment (a notebook executed by the tests, which cannot pass arguments to its kernel)."""
    return "--quick" in sys.argv or os.environ.get("WEIGHTLAB_QUICK", "") == "1"


def _backends_started() -> bool:
    try:
        from jax._src import xla_bridge
    except ImportError:  # pragma: no cover - jax not installed
        return False
    started = getattr(xla_bridge, "backends_are_initialized", None)
    return bool(started()) if callable(started) else bool(getattr(xla_bridge, "_backends", {}))


def _add_flag(flag: str, name: str) -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    if name not in flags:
        os.environ["XLA_FLAGS"] = (flags + " " + flag).strip()


def setup_devices(n_cpu: int = 8, *, fast_compile: bool = False) -> str:
    """Prepare XLA before the first JAX computation; returns the platform JAX will start on (``"cpu"``, ``"gpu"``,
    ``"tpu"``).

    On CPU only: ``n_cpu`` virtual host devices (``--xla_force_host_platform_device_count``, kept if already set)
    and, with ``fast_compile``, LLVM backend optimization level 0 (tiny quick-mode models are compile-bound; it
    changes code generation only, not the HLO or its float semantics). On a GPU/TPU nothing is set. If a backend
    has already started, the flags can no longer apply: a warning says so (restart the runtime)."""
    if n_cpu < 1:
        raise ValueError(f"n_cpu must be >= 1, got {n_cpu}")
    kind = accelerator_expected()
    if kind is not None:
        return kind
    if _backends_started() and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        warnings.warn("setup_devices: a JAX backend has already started, so the virtual CPU devices cannot be set "
                      "any more; restart the runtime and run this cell first", RuntimeWarning, stacklevel=2)
    _add_flag(f"--xla_force_host_platform_device_count={n_cpu}", "xla_force_host_platform_device_count")
    if fast_compile:
        _add_flag("--xla_backend_optimization_level=0", "xla_backend_optimization_level")
    return "cpu"
