"""The one progress-bar helper of the library (``jaxmodels``, ``merging`` and ``quant`` all use it).

Every long loop takes ``progress: bool | None``: ``None`` (the default) shows a bar, ``False`` hides it, and the
environment variable ``WEIGHTLAB_NO_PROGRESS`` set to anything but ``""``/``"0"`` hides every bar whatever the
argument (for CI and batch jobs)::

    for batch in progress_bar(batches, progress, desc="capture", total=n):
        ...
"""

from __future__ import annotations

import os
from typing import Any, Iterable

__all__ = ["progress_enabled", "progress_bar", "ENV_VAR"]

ENV_VAR = "WEIGHTLAB_NO_PROGRESS"


def progress_enabled(progress: bool | None = None) -> bool:
    """Whether a bar shows: off when ``progress`` is False or env ``WEIGHTLAB_NO_PROGRESS`` is set (not "0")."""
    if os.environ.get(ENV_VAR, "") not in ("", "0"):
        return False
    return True if progress is None else bool(progress)


def progress_bar(iterable: Iterable, progress: bool | None = None, *, desc: str | None = None,
                 total: int | None = None, leave: bool = False, **tqdm_kwargs: Any) -> Iterable:
    """``iterable`` wrapped in a ``tqdm.auto`` bar when :func:`progress_enabled`, else ``iterable`` itself.

    ``desc``, ``total``, ``leave`` (default False: the bar disappears when done) and any other keyword
    (``unit``, ``file``, ...) go to tqdm.
    """
    if not progress_enabled(progress):
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=leave, **tqdm_kwargs)
