"""Run a colab (jupytext percent script) top to bottom in --quick mode in a fresh interpreter, as CI does."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_colab(name: str, *args: str, timeout: int = 600, optimized: bool = False) -> str:
    """Run ``colabs/<name>.py --quick`` and return its stdout; fail the test with its output on error.

    ``optimized``: run the child at XLA's default backend optimization level, not the suite's level 0 from
    tests/conftest.py. For the colabs that are run-bound, not compile-bound (GPTQ column loops, AWQ grid searches,
    QAT training; measured CPU-s at level 0 -> default: ptq 200 -> 145, llm_ptq 57.5 -> 53.8, qat 61.7 -> 57.1). It
    changes code generation only, not the HLO or its float semantics.
    """
    env = dict(os.environ)
    if optimized:
        flags = env.get("XLA_FLAGS", "").split()
        env["XLA_FLAGS"] = " ".join(f for f in flags if not f.startswith("--xla_backend_optimization_level"))
    env.setdefault("MPLBACKEND", "Agg")
    env["WEIGHTLAB_NO_PROGRESS"] = "1"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "colabs" / f"{name}.py"), "--quick", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"colabs/{name}.py failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-4000:]}")
    return proc.stdout
