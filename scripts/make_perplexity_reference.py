"""Reference perplexities from transformers' own loss, for ``tests/jaxmodels/test_perplexity.py``.

Run in a throwaway environment OUTSIDE the project (torch / transformers are not weightlab dependencies); the
committed ``tests/data/perplexity_reference.npz`` was made with transformers 5.24.0, torch 2.13.0+cpu (the exact
versions are stored in the file under ``versions``)::

    /tmp/mkenv/bin/python scripts/make_perplexity_reference.py [--out tests/data/perplexity_reference.npz]

For each model NAME (a Hugging Face folder loaded with ``AutoModelForCausalLM.from_pretrained(dtype=float32,
attn_implementation="eager")``):

    hf_llama      tests/data/hf/llama (H1's tiny random Llama: GQA, untied, Llama-3 rope scaling), token ids drawn
                  with numpy default_rng(0) from its 128-token vocabulary, 4 windows of 32 + 7 tail tokens
    tiny_decoder  tests/data/tiny_decoder (the trained bf16 decoder, computed in float32), the first 8 windows of
                  128 tokens of the corpus' test split as its tokenizer encodes it, + 5 tail tokens

the file holds ``NAME/tokens`` (the whole stream, tail included: the evaluation must drop it), ``NAME/seq_len``,
``NAME/window_loss`` (``model(input_ids=window, labels=window).loss`` per non-overlapping window: transformers
shifts the labels and averages over the T - 1 predicted tokens) and ``NAME/ppl`` = exp(mean of the window
losses), the GPTQ ``opt_eval`` number.
"""

from __future__ import annotations

import argparse
import json
import os
import platform

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_decoder_tokens(folder: str, n_windows: int, seq_len: int) -> np.ndarray:
    import importlib.util

    from tokenizers import Tokenizer

    # jaxmodels/text.py needs only numpy: loaded as a file, without the jaxmodels package (jax is not installed here)
    spec = importlib.util.spec_from_file_location("weightlab_text", os.path.join(ROOT, "jaxmodels", "text.py"))
    text = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(text)
    load_corpus = text.load_corpus
    tok = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    ids = np.asarray(tok.encode(load_corpus("test"), add_special_tokens=False).ids, np.int32)
    return ids[: n_windows * seq_len + 5]


def reference(folder: str, tokens: np.ndarray, seq_len: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    n = len(tokens) // seq_len
    losses = []
    with torch.no_grad():
        for w in tokens[: n * seq_len].reshape(n, seq_len):
            ids = torch.as_tensor(w[None].astype(np.int64))
            losses.append(float(model(input_ids=ids, labels=ids).loss))
    losses = np.asarray(losses, np.float64)
    return {"tokens": tokens.astype(np.int32), "seq_len": np.int64(seq_len), "window_loss": losses,
            "ppl": np.float64(np.exp(losses.mean()))}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "data", "perplexity_reference.npz"))
    args = ap.parse_args()
    import tokenizers
    import torch
    import transformers

    out = {}
    rng = np.random.default_rng(0)
    for name, folder, tokens, seq_len in (
            ("hf_llama", os.path.join(ROOT, "tests", "data", "hf", "llama"),
             rng.integers(0, 128, size=4 * 32 + 7), 32),
            ("tiny_decoder", os.path.join(ROOT, "tests", "data", "tiny_decoder"), None, 128)):
        if tokens is None:
            tokens = tiny_decoder_tokens(folder, 8, seq_len)
        ref = reference(folder, np.asarray(tokens), seq_len)
        print(f"{name}: {len(tokens)} tokens, seq_len {seq_len}, ppl {float(ref['ppl']):.6f}")
        out.update({f"{name}/{k}": v for k, v in ref.items()})
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
                "numpy": np.__version__}
    out["versions"] = np.asarray(json.dumps(versions))
    tmp = args.out + ".tmp.npz"
    np.savez(tmp, **out)
    os.replace(tmp, args.out)
    print(f"wrote {args.out} ({versions})")


if __name__ == "__main__":
    main()
