"""Child process for the streaming-memory test: warm up (compile) on a 1-tensor merge, then, for each checkpoint
prefix given, report the growth of peak RSS (VmHWM, reset first) while merging those checkpoints.
Usage: python _stream_child.py DIR N_MODELS PREFIX [PREFIX ...]; prints {"peak_growth": {PREFIX: bytes}}.

The test passes the large merge first: it then runs in the same state as a fresh process after the warm-up, and
the small merge after it can only reuse memory the large one freed (a smaller baseline, so large - small can only
come out larger: the comparison stays conservative while one process saves a JAX import and a compile)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from merging.cli import run_merge  # noqa: E402


def status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(field)


def reset_peak() -> bool:
    """Reset VmHWM (peak RSS) to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def cfg(prefix: str, n: int) -> dict:
    return {"merge_method": "ties", "base_model": f"{prefix}0.safetensors",
            "models": [{"model": f"{prefix}{i}.safetensors", "parameters": {"weight": 1.0, "density": 0.5}}
                       for i in range(1, n)]}


d, n, prefixes = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
run_merge(cfg("warm", n), d / "warm_out", root=d, progress=False, overwrite=True)
import gc  # noqa: E402

growth = {}
for prefix in prefixes:
    gc.collect()
    assert reset_peak(), "cannot reset the peak RSS on this kernel"
    before = status("VmRSS")
    assert status("VmHWM") - before < 4 << 20, "peak was not reset"
    run_merge(cfg(prefix, n), d / f"{prefix}_out", root=d, progress=False, overwrite=True)
    growth[prefix] = status("VmHWM") - before
print(json.dumps({"peak_growth": growth}))
