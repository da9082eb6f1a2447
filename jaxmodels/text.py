"""A text corpus that needs no network, a Hugging Face tokenizer loader, and encoding into one token stream.

The corpus is the Python Language Reference / Library Reference help text that ships with every CPython as
``pydoc_data.topics`` (the text ``help("assert")`` shows; about 465 kB, 79 topics, English prose with code and
grammar snippets). It is deterministic for a given Python version (the text changes between versions, so anything
that must be bit-stable, such as a reference perplexity, is computed on committed token ids, not on this text).

Construction (:func:`corpus_documents`): topics in sorted key order; each is split into paragraphs (blank-line
separated); trailing whitespace is stripped and a paragraph whose whitespace-normalized text already occurred in an
earlier topic is dropped (the topics repeat each other: ``compound`` contains ``if``, ``while``, ...), so no
paragraph is in two documents. Splits (:func:`load_corpus`) are whole documents: in the order of the CRC-32 of their
key, each document goes to the split whose character count is furthest below its target fraction (train 0.9,
validation 0.05, test 0.05), so the three splits share no document and no paragraph. Documents are joined with
``"\\n\\n"`` as the GPTQ / AWQ evaluation joins WikiText-2's lines before tokenizing.
"""

from __future__ import annotations

import os
import re
import zlib
from pathlib import Path

import numpy as np

__all__ = ["SPLITS", "SPLIT_FRACTIONS", "corpus_documents", "split_documents", "load_corpus", "load_tokenizer",
           "train_bpe_tokenizer", "encode", "corpus_tokens"]

SPLITS = ("train", "validation", "test")
SPLIT_FRACTIONS = {"train": 0.9, "validation": 0.05, "test": 0.05}


def _normalize(paragraph: str) -> str:
    return "\n".join(line.rstrip() for line in paragraph.strip("\n").split("\n"))


def corpus_documents() -> list[tuple[str, str]]:
    """``[(topic, text)]`` from ``pydoc_data.topics``: sorted by topic, paragraphs deduplicated across topics (a
    paragraph equal, up to whitespace, to one of an earlier topic is dropped); topics left empty are omitted."""
    from pydoc_data.topics import topics

    seen: set[str] = set()
    docs = []
    for key in sorted(topics):
        kept = []
        for p in re.split(r"\n[ \t]*\n", topics[key].replace("\r\n", "\n").replace("\r", "\n")):
            p = _normalize(p)
            norm = " ".join(p.split())
            if not norm or norm in seen:
                continue
            seen.add(norm)
            kept.append(p)
        if kept:
            docs.append((key, "\n\n".join(kept)))
    return docs


def split_documents(docs: list[tuple[str, str]] | None = None) -> dict[str, list[tuple[str, str]]]:
    """Assign whole documents to train / validation / test (see the module docstring); each split keeps the
    documents in topic order."""
    docs = corpus_documents() if docs is None else list(docs)
    total = sum(len(t) for _, t in docs)
    size = {s: 0 for s in SPLITS}
    assigned: dict[str, str] = {}
    for key, text in sorted(docs, key=lambda kd: (zlib.crc32(kd[0].encode()), kd[0])):
        split = max(SPLITS, key=lambda s: (SPLIT_FRACTIONS[s] * total - size[s]) / SPLIT_FRACTIONS[s])
        assigned[key] = split
        size[split] += len(text)
    return {s: [(k, t) for k, t in docs if assigned[k] == s] for s in SPLITS}


def load_corpus(split: str) -> str:
    """The text of one split (``"train"``, ``"validation"`` or ``"test"``): its documents joined by ``"\\n\\n"``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return "\n\n".join(t for _, t in split_documents()[split])


def load_tokenizer(path: str | os.PathLike):
    """A Hugging Face fast tokenizer (``tokenizers.Tokenizer``) from a ``tokenizer.json`` file or a folder that
    holds one (a Hugging Face model folder)."""
    from tokenizers import Tokenizer

    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise FileNotFoundError(f"no tokenizer.json at {path}")
    return Tokenizer.from_file(str(p))


def train_bpe_tokenizer(text: str, vocab_size: int, special_tokens=("<|endoftext|>",)):
    """A byte-level BPE tokenizer (GPT-2's scheme: the 256 byte symbols, then merges) of ``vocab_size`` tokens
    trained on ``text`` with ``tokenizers`` (deterministic for a given text); ``tokenizer.save(path)`` writes the
    ``tokenizer.json`` that :func:`load_tokenizer` and transformers read. Lossless: ``decode(encode(s)) == s``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    n_min = 256 + len(special_tokens)
    if int(vocab_size) != vocab_size or vocab_size < n_min:
        raise ValueError(f"vocab_size must be an integer >= {n_min} (256 bytes + special tokens), got {vocab_size!r}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=int(vocab_size), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=list(special_tokens), show_progress=False)
    tok.train_from_iterator([text], trainer=trainer)
    return tok


def encode(tokenizer, text: str, add_special_tokens: bool = False) -> np.ndarray:
    """``text`` as one long ``int32`` token stream ``[N]`` (the perplexity evaluation's input)."""
    if not isinstance(text, str):
        raise TypeError(f"encode expects a str, got {type(text).__name__}")
    ids = tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
    return np.asarray(ids, dtype=np.int32)


def corpus_tokens(tokenizer, split: str) -> np.ndarray:
    """:func:`load_corpus` ``(split)`` encoded with ``tokenizer`` into one ``int32`` stream."""
    return encode(tokenizer, load_corpus(split))
