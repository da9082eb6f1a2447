"""Every name a public module lists in ``__all__`` exists (a re-export dropped from an ``__init__`` — e.g. by an
import clean-up — breaks ``from package import *`` and every user of the name)."""

import importlib
import pkgutil

import pytest

PACKAGES = ("jaxmodels", "merging", "quant")


def _public_modules():
    for pkg in PACKAGES:
        yield pkg
        for m in pkgutil.walk_packages(importlib.import_module(pkg).__path__, pkg + "."):
            if not any(part.startswith("_") for part in m.name.split(".")[1:]):
                yield m.name


def test_every_name_in_all_exists():
    missing = []
    for name in _public_modules():
        mod = importlib.import_module(name)
        missing += [f"{name}.{n}" for n in getattr(mod, "__all__", ()) if not hasattr(mod, n)]
    assert not missing, missing


@pytest.mark.parametrize("pkg", PACKAGES)
def test_star_import(pkg):
    ns = {}
    exec(f"from {pkg} import *", ns)  # noqa: S102 - the user's view of the package
