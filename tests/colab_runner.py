"""Run a colab top to bottom in quick mode *as a notebook*, as a user opens it: the committed ``colabs/<name>.ipynb``
executed cell by cell by nbclient in a fresh ipykernel (tests/test_notebooks_in_sync.py checks that the notebook is
the jupytext rendering of ``colabs/<name>.py``). Quick mode and the plot folder reach the kernel through the
environment (``WEIGHTLAB_QUICK=1``, ``WEIGHTLAB_COLAB_OUT``): a kernel has no command line of its own."""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_colab(name: str, *, out: str | os.PathLike | None = None, timeout: int = 600, optimized: bool = False) -> str:
    """Execute ``colabs/<name>.ipynb`` in quick mode and return everything its cells printed (stdout streams, in
    order); fail the test with the failing cell's traceback and the output so far.

    ``optimized``: run the kernel at XLA's default backend optimization level, not the suite's level 0 from
    tests/conftest.py. For the colabs that are run-bound, not compile-bound (GPTQ column loops, AWQ grid searches,
    QAT training; measured CPU-s at level 0 -> default: ptq 200 -> 145, llm_ptq 57.5 -> 53.8, qat 61.7 -> 57.1). It
    changes code generation only, not the HLO or its float semantics. ``timeout``: seconds per cell.
    """
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    env = dict(os.environ)
    if optimized:
        flags = env.get("XLA_FLAGS", "").split()
        env["XLA_FLAGS"] = " ".join(f for f in flags if not f.startswith("--xla_backend_optimization_level"))
    env.setdefault("MPLBACKEND", "Agg")
    env["WEIGHTLAB_NO_PROGRESS"] = "1"
    env["WEIGHTLAB_QUICK"] = "1"
    if out is not None:
        env["WEIGHTLAB_COLAB_OUT"] = str(out)
    nb = nbformat.read(ROOT / "colabs" / f"{name}.ipynb", as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT / "colabs")}})

    def printed() -> str:
        return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", ())
                       if o.get("output_type") == "stream" and o.get("name") == "stdout")

    try:
        client.execute(env=env)
    except CellExecutionError as e:
        raise AssertionError(f"colabs/{name}.ipynb failed:\n{printed()[-4000:]}\n{str(e)[-6000:]}") from None
    return printed()
