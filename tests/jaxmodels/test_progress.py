"""jaxmodels.progress: the one progress-bar helper (default on; ``progress=False`` or WEIGHTLAB_NO_PROGRESS turn
it off), and no package keeps its own copy or imports another package's private helper."""

import re
from pathlib import Path

import pytest

from jaxmodels.progress import ENV_VAR, progress_bar, progress_enabled

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)


def test_default_on_flag_off(no_env):
    assert progress_enabled() and progress_enabled(None) and progress_enabled(True)
    assert not progress_enabled(False)


@pytest.mark.parametrize("value,enabled", [("1", False), ("yes", False), ("0", True), ("", True)])
def test_env_var_turns_every_bar_off(monkeypatch, value, enabled):
    monkeypatch.setenv(ENV_VAR, value)
    assert progress_enabled(None) is enabled
    assert progress_enabled(True) is enabled  # the environment wins over an explicit True
    assert not progress_enabled(False)


def test_wraps_any_iterable(no_env, monkeypatch, capsys):
    from tqdm.auto import tqdm

    gen = (i * i for i in range(5))
    bar = progress_bar(gen, None, desc="squares", total=5)
    assert isinstance(bar, tqdm) and bar.total == 5 and bar.desc.startswith("squares")
    assert list(bar) == [0, 1, 4, 9, 16]
    items = [1, 2, 3]
    assert progress_bar(items, False) is items  # off: the iterable itself, no tqdm object
    monkeypatch.setenv(ENV_VAR, "1")
    assert progress_bar(items, True, desc="x") is items
    assert list(progress_bar(iter(range(3)), None)) == [0, 1, 2]


def test_one_helper_and_no_private_cross_package_imports():
    """S5-3/S5-4 of the 0cb843d review: progress gating lived in four places and merging imported
    ``jaxmodels.capture._tqdm`` in seven modules; quant/ptq/zeroq aliased ``module_path`` as ``_module_path``."""
    private = re.compile(r"^\s*from\s+(jaxmodels|merging|quant)(\.[\w.]+)?\s+import\s+(\([^)]*\)|[^\n]*)", re.M)
    gating = re.compile(r"os\.environ.*WEIGHTLAB_NO_PROGRESS|from tqdm|import tqdm")
    bad, copies = [], []
    for pkg in ("jaxmodels", "merging", "quant"):
        for f in sorted((ROOT / pkg).rglob("*.py")):
            text = f.read_text()
            for m in private.finditer(text):
                if m.group(1) == pkg:
                    continue  # inside one package its own private helpers are fine
                names = [n.split("#")[0].strip() for n in re.split(r"[,\n]", m.group(3).strip("()"))]
                def private_name(n):  # _x is private; a dunder (__version__) is public by convention
                    return n.startswith("_") and not (n.startswith("__") and n.endswith("__"))

                if any(private_name(part) for part in (m.group(2) or "").split(".")) or any(
                        private_name(n) for n in names):
                    bad.append(f"{f.relative_to(ROOT)}: {m.group(0).strip()}")
            if f.name != "progress.py" and gating.search(text):
                copies.append(str(f.relative_to(ROOT)))
    assert bad == [], bad
    assert copies == [], copies
