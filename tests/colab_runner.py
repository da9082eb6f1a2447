"""Run a colab (jupytext percent script) top to bottom in --quick mode in a fresh interpreter, as CI does."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_colab(name: str, *args: str, timeout: int = 600) -> str:
    """Run ``colabs/<name>.py --quick`` and return its stdout; fail the test with its output on error."""
    env = dict(os.environ)
    env.setdefault("MPLBACKEND", "Agg")
    env["WEIGHTLAB_NO_PROGRESS"] = "1"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "colabs" / f"{name}.py"), "--quick", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"colabs/{name}.py failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-4000:]}")
    return proc.stdout
