"""The trained tiny decoder of tests/data/tiny_decoder (Llama family, hidden 128, 3 blocks, GQA) with the calibration
windows and held-out tokens the pruning and depth tests share: one loader instead of a copy per test module, cached
per process (xdist worker)."""

import functools
from pathlib import Path

import jax.numpy as jnp
import numpy as np

FOLDER = Path(__file__).resolve().parent / "data" / "tiny_decoder"
SEQ = 128


@functools.lru_cache(maxsize=None)
def _loaded():
    from jaxmodels import text
    from jaxmodels.models import load_pretrained

    tok = text.load_tokenizer(FOLDER)
    model, params = load_pretrained(FOLDER, dtype=jnp.float32, progress=False)
    return model, params, text.corpus_tokens(tok, "train"), text.corpus_tokens(tok, "test")


def tiny_decoder(n_calib: int = 16, seed: int = 0):
    """``(model, params, calib, test)``: ``calib`` int32 ``[n_calib, SEQ]`` windows of the training split at
    ``np.random.default_rng(seed)`` offsets, ``test`` the first 16 held-out windows of 128 tokens (+1 for the
    shifted targets). The params are shared between callers: tests never modify them (the library never does)."""
    model, params, train, test = _loaded()
    off = np.random.default_rng(seed).integers(0, len(train) - SEQ, size=n_calib)
    return model, params, np.asarray(train[off[:, None] + np.arange(SEQ)], np.int32), test[:16 * SEQ + 1]
