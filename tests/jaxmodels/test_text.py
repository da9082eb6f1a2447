"""jaxmodels.text: the bundled corpus (deterministic, three disjoint splits), tokenizer loading and encoding."""

import re
from pathlib import Path

import numpy as np
import pytest

from jaxmodels import text

TINY = Path(__file__).resolve().parents[1] / "data" / "tiny_decoder"


@pytest.fixture(scope="module")
def splits():
    return text.split_documents()


def _paragraphs(docs):
    return {" ".join(p.split()) for _, t in docs for p in re.split(r"\n[ \t]*\n", t) if p.strip()}


def test_splits_disjoint_and_sized(splits):
    keys = {s: {k for k, _ in d} for s, d in splits.items()}
    assert not keys["train"] & keys["validation"] and not keys["train"] & keys["test"]
    assert not keys["validation"] & keys["test"]
    assert set().union(*keys.values()) == {k for k, _ in text.corpus_documents()}  # nothing lost
    paras = {s: _paragraphs(d) for s, d in splits.items()}
    assert not paras["train"] & paras["validation"] and not paras["train"] & paras["test"]
    assert not paras["validation"] & paras["test"]
    total = sum(len(t) for d in splits.values() for _, t in d)
    for s, frac in text.SPLIT_FRACTIONS.items():
        got = sum(len(t) for _, t in splits[s]) / total
        assert abs(got - frac) < 0.03, (s, got)  # whole documents: within 3 points of the target


def test_corpus_deterministic(splits):
    assert text.split_documents() == splits
    assert text.load_corpus("validation") == "\n\n".join(t for _, t in splits["validation"])
    with pytest.raises(ValueError, match="split must be one of"):
        text.load_corpus("dev")


def test_tokenizer_round_trip(tmp_path):
    tok = text.load_tokenizer(TINY)  # the tiny decoder's byte-level BPE (scripts/train_tiny_decoder.py)
    assert tok.get_vocab_size() == text.load_tokenizer(TINY / "tokenizer.json").get_vocab_size()
    s = text.load_corpus("test")
    ids = text.encode(tok, s)
    assert ids.dtype == np.int32 and ids.ndim == 1 and 0 <= ids.min() and ids.max() < tok.get_vocab_size()
    assert tok.decode(ids.tolist()) == s  # byte-level BPE is lossless
    assert len(ids) < 0.6 * len(s.encode())  # BPE merges: fewer tokens than bytes
    np.testing.assert_array_equal(text.corpus_tokens(tok, "test"), ids)
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        text.load_tokenizer(tmp_path)
    with pytest.raises(TypeError, match="expects a str"):
        text.encode(tok, ["a list"])
