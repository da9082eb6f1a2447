"""all-MiniLM-L6-v2 (``jaxmodels.models.bert``) as a :class:`quant.ptq.blocks.BlockModel`, and bundled text.

Calibration and evaluation sentences are taken from docstrings of Python's standard library (bundled with every
Python, so offline and deterministic): calibration from one set of modules, evaluation from a disjoint set, and the
two sentence lists are checked to share no sentence.
"""

from __future__ import annotations

import importlib
import inspect
import re

import jax.numpy as jnp
import numpy as np

from .blocks import AWQGroup, BlockModel

__all__ = ["bert_block_model", "docstring_sentences", "calibration_sentences", "evaluation_sentences",
           "CALIB_MODULES", "EVAL_MODULES"]

CALIB_MODULES = ("collections", "functools", "itertools", "json", "os", "re", "pathlib", "textwrap", "string",
                 "random", "statistics", "heapq", "bisect", "shutil", "tempfile", "subprocess")
EVAL_MODULES = ("argparse", "datetime", "email.message", "logging", "unittest", "csv", "decimal", "fractions",
                "calendar", "difflib", "zipfile", "tarfile", "socket", "threading", "http.client", "urllib.parse")


def docstring_sentences(modules, n: int | None, seed: int = 0, min_chars: int = 40, max_chars: int = 200,
                        exclude=()) -> list[str]:
    """``n`` distinct sentences (random order fixed by ``seed``) from docstrings of ``modules`` and their members."""
    found: list[str] = []
    seen = set(exclude)
    for name in modules:
        mod = importlib.import_module(name)
        docs = [mod.__doc__ or ""]
        for _, obj in sorted(vars(mod).items()):
            if inspect.isfunction(obj) or inspect.isclass(obj):
                if getattr(obj, "__module__", None) == mod.__name__:
                    docs.append(obj.__doc__ or "")  # own docstring only (getdoc inherits)
        for doc in docs:
            text = re.sub(r"\s+", " ", doc)
            for s in re.split(r"(?<=[.!?])\s+", text):
                s = s.strip()
                if min_chars <= len(s) <= max_chars and re.match(r"^[A-Z]", s) and ">>>" not in s and s not in seen:
                    seen.add(s)
                    found.append(s)
    if n is None:
        return found
    if len(found) < n:
        raise ValueError(f"only {len(found)} sentences found in {modules}, {n} requested")
    idx = np.random.default_rng(seed).permutation(len(found))[:n]
    return [found[i] for i in sorted(idx)]


def calibration_sentences(n: int = 128, seed: int = 0) -> list[str]:
    """``n`` calibration sentences (order fixed by ``seed``) from the docstrings of :data:`CALIB_MODULES` (standard
    library modules, offline and deterministic), via :func:`docstring_sentences`."""
    return docstring_sentences(CALIB_MODULES, n, seed)


def evaluation_sentences(n: int = 256, seed: int = 1) -> list[str]:
    """``n`` evaluation sentences (order fixed by ``seed``) from the docstrings of :data:`EVAL_MODULES`, excluding every
    calibration sentence; raises if any overlap remains."""
    calib = set(docstring_sentences(CALIB_MODULES, None))
    ev = docstring_sentences(EVAL_MODULES, n, seed, exclude=calib)
    overlap = calib.intersection(ev)
    if overlap:
        raise AssertionError(f"evaluation sentences overlap calibration sentences: {sorted(overlap)[:3]}")
    return ev


def bert_block_model(embedder) -> BlockModel:
    """Split a ``jaxmodels.models.bert.SentenceEmbedder``/``BertEncoder`` into embed -> layer_i -> mean-pool head.

    AWQ groups (post-LN BERT): query/key/value share the input h (a residual too, so ``1/s`` cannot be folded into
    the LayerNorm: it is kept as an input scale) judged on the whole block output; ``attention_output`` folds ``1/s``
    into ``value``'s output features (attention is linear in V); ``intermediate`` (post-LN residual) and ``output``
    (after GELU) keep an input scale, as llm-awq's ``ScaledActivation``.
    """
    from jaxmodels.models.bert import BertEmbeddings, BertLayer, l2_normalize, mean_pool
    from jaxmodels.models.transformer import padding_mask

    enc = getattr(embedder, "model", embedder)
    cfg = enc.config
    emb_mod = BertEmbeddings(cfg, enc.norm, enc.dtype)
    layer = BertLayer(cfg, enc.norm, enc.dtype)

    def embed(params, batch):
        ids = jnp.asarray(batch["input_ids"])
        am = jnp.asarray(batch["attention_mask"])
        tt = jnp.asarray(batch["token_type_ids"]) if "token_type_ids" in batch else jnp.zeros_like(ids)
        h = emb_mod.apply({"params": params["embeddings"]}, ids, tt)
        return h, {"mask": padding_mask(am)}

    def token_weight(ctx):
        return ctx["mask"][:, 0, 0, :].astype(jnp.float32)

    def head(params, h, ctx):
        return l2_normalize(mean_pool(h, token_weight(ctx)))

    return BlockModel(
        embed=embed, block=layer, block_paths=[f"layer_{i}" for i in range(cfg.num_hidden_layers)], head=head,
        token_weight=token_weight, num_heads=cfg.num_attention_heads,
        awq_groups=(AWQGroup(("attention/query", "attention/key", "attention/value"), None, "block"),
                    AWQGroup(("attention/attention_output",), "attention/value", "linear"),
                    AWQGroup(("intermediate",), None, "linear"),
                    AWQGroup(("output",), None, "linear")))
