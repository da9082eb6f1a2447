"""The committed notebooks are the jupytext renderings of the colab scripts, and every notebook opens with the same
setup cell (install when not importable, devices chosen by jaxmodels.runtime) after its Open-in-Colab badge."""

from pathlib import Path

import jupytext
import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "colabs").glob("*.py"))


def _cells(nb):
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_notebook_is_the_rendering_of_its_script(script):
    notebook = script.with_suffix(".ipynb")
    assert notebook.exists(), f"{notebook.name} is missing: run `make colabs` and commit it"
    committed = nbformat.read(notebook, as_version=4)
    rendered = jupytext.read(script, fmt="py:percent")
    assert _cells(committed) == _cells(rendered), f"{notebook.name} differs from {script.name}: run `make colabs`"
    # outputs stripped: what a user opens is the code, not a stale run
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in committed.cells
               if c.cell_type == "code"), notebook.name


def test_every_notebook_starts_with_the_badge_and_the_same_setup_cell():
    setups = {}
    for script in SCRIPTS:
        nb = jupytext.read(script, fmt="py:percent")
        first_md = next(c for c in nb.cells if c.cell_type == "markdown")
        assert first_md.source.startswith("[![Open In Colab]"), script.name
        assert f"/colabs/{script.stem}.ipynb" in first_md.source, script.name
        first_code = next(c for c in nb.cells if c.cell_type == "code")
        assert "jaxmodels.runtime.setup_devices(8)" in first_code.source, script.name
        setups[script.stem] = first_code.source
    assert len(set(setups.values())) == 1, "the setup cells differ: " + ", ".join(setups)
