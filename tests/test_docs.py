"""The documentation: a docstring on every exported name, the API reference covering every public module, the CLI
reference in sync with ``--help``, and the mkdocs site building with warnings as errors (issue 22, "Docs").

Public modules are found on disk (``pkgutil.iter_modules`` over the package folders, no import needed to list
them), so a new module is covered without editing this file; a module or package whose name (or a parent's) starts
with ``_`` is private. A module that fails to import fails the test unless the missing module is an optional
dependency of the project (an extra of ``pyproject.toml`` that the core dependencies do not include); those are
skipped with their names.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import inspect
import io
import os
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("jaxmodels", "merging", "quant")
API_DIR = ROOT / "docs" / "api"
# distribution name -> import name, where they differ (the rest: lower case, "-" -> "_")
IMPORT_NAMES = {"scikit-learn": "sklearn", "pyyaml": "yaml", "orbax-checkpoint": "orbax"}


def public_modules() -> list[str]:
    """Every public module and package of the three packages, in walk order, found on disk."""

    def walk(name: str, path: Path) -> list[str]:
        out = [name]
        for m in pkgutil.iter_modules([str(path)]):
            if m.name.startswith("_"):
                continue
            full = f"{name}.{m.name}"
            out += walk(full, path / m.name) if m.ispkg else [full]
        return out

    return [m for pkg in PACKAGES for m in walk(pkg, ROOT / pkg)]


def _import_name(requirement: str) -> str:
    dist = re.split(r"[\s\[<>=!~;]", requirement.strip(), maxsplit=1)[0].lower()
    return IMPORT_NAMES.get(dist, dist.replace("-", "_"))


def optional_imports() -> set[str]:
    """Top-level import names of the optional dependencies: in some extra, not in the core dependencies."""
    text = (ROOT / "pyproject.toml").read_text()
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    project = tomllib.loads(text)["project"]
    core = {_import_name(r) for r in project.get("dependencies", [])}
    extras = {_import_name(r) for reqs in project.get("optional-dependencies", {}).values() for r in reqs}
    return extras - core - set(PACKAGES)


def _auto_class_doc(cls: type, doc: str) -> bool:
    """The one-line signature docstring that dataclasses, NamedTuples and linen modules generate, not a real one."""
    doc = doc.strip()
    return doc == "An enumeration." or ("\n" not in doc and doc.startswith(f"{cls.__name__}(") and doc.endswith(")"))


def _missing_doc(obj) -> str | None:
    """Why ``obj`` (a class or function) has no docstring, or None if it has one."""
    if inspect.isclass(obj):
        doc = obj.__dict__.get("__doc__")  # its own, not a base class's
        if not doc or not doc.strip():
            return "no docstring"
        return "only the generated signature docstring" if _auto_class_doc(obj, doc) else None
    doc = getattr(obj, "__doc__", None)
    if isinstance(obj, functools.partial) or doc is type(obj).__doc__:
        doc = None  # the wrapper type's docstring, not the function's
    if doc and doc.strip():
        return None
    wrapped = getattr(obj, "__wrapped__", None)
    if "<locals>" in getattr(obj, "__qualname__", "") or (wrapped is not None and wrapped.__doc__):
        return "no docstring (a decorator that drops it? use functools.wraps)"
    return "no docstring"


def _is_documentable(obj) -> bool:
    """A class or a function: plain, builtin, a ``functools.partial`` or a wrapper with ``__wrapped__`` (jit)."""
    return (inspect.isclass(obj) or inspect.isroutine(obj) or isinstance(obj, functools.partial)
            or (callable(obj) and hasattr(obj, "__wrapped__") and not inspect.ismodule(obj)))


def _exported(mod) -> list[str]:
    """``__all__``; without one, the public classes and functions the module itself defines."""
    names = getattr(mod, "__all__", None)
    if names is not None:
        return list(names)
    return [n for n, v in vars(mod).items() if not n.startswith("_") and _is_documentable(v)
            and getattr(v, "__module__", None) == mod.__name__]


def test_every_exported_name_has_a_docstring():
    optional = None
    skipped, problems, seen = [], [], {}
    for name in public_modules():
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            optional = optional_imports() if optional is None else optional
            top = (e.name or "").split(".")[0]
            if top in optional:
                skipped.append(f"{name} (needs the optional {top})")
                continue
            raise AssertionError(f"{name} does not import: {e!r}") from e
        for attr in _exported(mod):
            if not hasattr(mod, attr):
                problems.append(f"{name}.__all__ names {attr!r}, which {name} does not define")
                continue
            obj = getattr(mod, attr)
            if not _is_documentable(obj):
                continue  # constants, type aliases, sub-modules
            if id(obj) in seen:
                continue  # a re-export: reported (or passed) where first seen
            seen[id(obj)] = f"{name}.{attr}"
            why = _missing_doc(obj)
            if why:
                where = f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', attr)}"
                problems.append(f"{name}.{attr} ({where}): {why}")
    assert len(seen) > 500, f"only {len(seen)} exported classes / functions found: is the walk broken?"
    assert not problems, f"{len(problems)} exported names without a docstring:\n" + "\n".join(problems)
    if skipped:
        pytest.skip(f"checked {len(seen)} names; modules needing optional dependencies skipped: {skipped}")


def _api_blocks() -> dict[str, str]:
    """``{module: page}`` for every ``::: module`` block of the API reference pages."""
    blocks = {}
    for page in sorted(API_DIR.glob("*.md")):
        for m in re.finditer(r"(?m)^:::\s+([\w.]+)\s*$", page.read_text()):
            blocks[m.group(1)] = page.name
    return blocks


def test_every_public_module_is_in_the_api_reference():
    blocks = _api_blocks()
    missing = [m for m in public_modules() if m not in blocks]
    assert not missing, (f"public modules without a `::: module` block in docs/api/*.md (add each to its package's "
                         f"page, e.g. docs/api/{missing[0].rsplit('.', 1)[0]}.md): {missing}")
    stale = sorted(set(blocks) - set(public_modules()))
    assert not stale, f"docs/api/*.md documents modules that do not exist: {stale}"
    nav = (ROOT / "mkdocs.yml").read_text()
    unlisted = sorted({p for p in blocks.values() if f"api/{p}" not in nav})
    assert not unlisted, f"API pages missing from mkdocs.yml's nav: {unlisted}"


def _help(main) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    return out.getvalue()


def _normalized(text: str) -> str:
    return " ".join(text.split())


def test_cli_reference_matches_help(monkeypatch):
    """docs/cli.md holds each CLI's ``--help`` verbatim (whitespace aside) and names every registered method."""
    import merging
    from merging.cli import main as merging_main
    from quant.cli import main as quant_main

    monkeypatch.setenv("COLUMNS", "100")  # argparse wraps at the terminal width
    page = (ROOT / "docs" / "cli.md").read_text()
    blocks = [_normalized(b) for b in re.findall(r"```text\n(.*?)```", page, flags=re.S)]
    for prog, main in (("merging", merging_main), ("quant", quant_main)):
        assert _normalized(_help(main)) in blocks, (
            f"docs/cli.md's `python -m {prog} --help` block is out of date: paste `COLUMNS=100 python -m {prog} "
            f"--help` into it")
    missing = [n for n in merging.available() if f"| `{n}` |" not in page]
    assert not missing, f"docs/cli.md's table of registered methods lacks {missing}"


def test_docs_build_strict(tmp_path):
    """``mkdocs build --strict`` (warnings are errors) of the whole site, with the current interpreter."""
    for mod in ("mkdocs", "mkdocstrings", "mkdocstrings_handlers.python", "material"):
        if importlib.util.find_spec(mod.split(".")[0]) is None or importlib.util.find_spec(mod) is None:
            pytest.skip(f"{mod} is not installed (the docs extra: pip install -e '.[docs]')")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                           "-d", str(tmp_path / "site")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    assert (tmp_path / "site" / "api" / "merging" / "index.html").is_file()
