"""Registry of merge methods: name -> pure function ``(base, models, **hparams) -> merged``.

Any module registers its method with the :func:`register` decorator, e.g.::

    @register("ties", needs_base=True, per_model=("weight", "density"), defaults={"normalize": True})
    def ties(base, models, *, weight=1.0, density=1.0, ...): ...

``per_model`` names the hyper-parameters that a mergekit YAML gives per model (``models[i].parameters``) and that
the function accepts as a scalar (same for every model) or as a sequence with one entry per model. ``defaults``
holds the value of every other hyper-parameter the CLI may pass. ``needs_base``: the method reads ``base``
(``True``), ignores it (``False``) or uses it when given (``"optional"``). ``stochastic``: the method takes an
explicit ``key`` (a ``jax.random`` key), so a merge is reproducible.

Names: ``per_model`` and ``defaults`` use the config (mergekit YAML) names. Two of them differ in Python,
:data:`PYTHON_NAMES`: the per-model ``weight`` is the Python ``weights`` (one entry per model) and ``lambda`` (a
Python keyword) is ``lambda_``; every other name is the same in both. :func:`python_kwargs` maps a config's
parameters to the function's keyword arguments.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

__all__ = ["MergeMethod", "register", "get", "available", "REGISTRY", "PYTHON_NAMES", "python_kwargs"]


@dataclasses.dataclass(frozen=True)
class MergeMethod:
    """A registered merge method (:func:`register`): its ``name``, the function ``fn(base, models, **hparams)`` (calling
    the record calls it), ``needs_base`` (True, False or "optional"), the ``per_model`` hyper-parameter names, the
    ``defaults`` of the others, ``stochastic`` (takes a ``key``) and ``streamable`` (merges each tensor independently,
    so the CLI streams it tensor by tensor)."""

    name: str
    fn: Callable[..., Any]
    needs_base: bool | str = True
    per_model: tuple[str, ...] = ()
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    stochastic: bool = False
    streamable: bool = True  # merges each tensor independently (the CLI streams it tensor by tensor)

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    @property
    def params(self) -> tuple[str, ...]:
        """Every hyper-parameter name the method accepts from a config."""
        return tuple(self.per_model) + tuple(k for k in self.defaults if k not in self.per_model)


REGISTRY: dict[str, MergeMethod] = {}

# config (mergekit YAML) name -> Python keyword, where they differ
PYTHON_NAMES: Mapping[str, str] = {"weight": "weights", "lambda": "lambda_"}


def python_kwargs(params: Mapping[str, Any]) -> dict[str, Any]:
    """Config-named hyper-parameters -> the merge function's keyword arguments (``weight`` -> ``weights``,
    ``lambda`` -> ``lambda_``; every other name unchanged)."""
    return {PYTHON_NAMES.get(k, k): v for k, v in params.items()}


def register(name: str, *, needs_base: bool | str = True, per_model: tuple[str, ...] = (),
             defaults: Mapping[str, Any] | None = None, stochastic: bool = False,
             streamable: bool = True) -> Callable[[Callable], Callable]:
    """Decorator registering ``fn`` under ``name`` (returns ``fn`` unchanged). Registering a taken name raises."""

    def deco(fn: Callable) -> Callable:
        if name in REGISTRY and REGISTRY[name].fn is not fn:
            raise ValueError(f"merge method {name!r} is already registered (by {REGISTRY[name].fn.__module__})")
        REGISTRY[name] = MergeMethod(name, fn, needs_base, tuple(per_model), dict(defaults or {}), stochastic,
                                     streamable)
        return fn

    return deco


def get(name: str) -> MergeMethod:
    """The registered method, or a ``ValueError`` listing the known names."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown merge method {name!r}; known: {', '.join(sorted(REGISTRY))}") from None


def available() -> list[str]:
    """The sorted names of every registered merge method (what ``merge_method:`` in a config may name)."""
    return sorted(REGISTRY)
