"""Tiny random Hugging Face decoders and their reference outputs, for the parity tests of
``jaxmodels.models.llama`` / ``gpt2`` / ``pretrained`` / ``generate``.

Run in a throwaway environment OUTSIDE the project (torch and transformers are not weightlab dependencies); the
files in ``tests/data/hf`` were made with transformers 5.24.0, torch 2.13.0+cpu, safetensors 0.8.0 (the exact
versions are stored in ``reference.npz`` under ``versions``)::

    /tmp/mkenv/bin/python scripts/make_hf_reference.py [--out tests/data/hf]
    /tmp/mkenv/bin/python scripts/make_hf_reference.py --check DIR [DIR ...]

The first form builds, with ``torch.manual_seed(0)`` and every parameter redrawn (norm weights 1 + 0.1 N(0, 1),
biases 0.1 N(0, 1), matrices 0.15 N(0, 1), so that biases and norms matter and greedy decoding has clear margins),
one folder per architecture (``config.json`` + ``model.safetensors`` via ``save_pretrained``):

    llama         GQA (4 heads, 2 kv heads), untied head, rope_theta 10000 with Llama-3 rope_scaling (factor 8,
                  low/high_freq_factor 1/4, original_max_position_embeddings 64: head_dim 8 puts one frequency in
                  each regime: kept, smoothed, divided by 8)
    llama_tied    tied embeddings, attention_bias + mlp_bias, MHA, "linear" rope scaling (factor 2)
    llama_sharded the llama model saved with max_shard_size 40KB (model.safetensors.index.json + shards)
    mistral       sliding_window 4 (< the test length, so the window is exercised), head_dim 16 != hidden/heads
    qwen2         q/k/v biases, o_proj without
    gpt2          LayerNorm, learned positions, gelu_new, tied head, Conv1D weights

and ``reference.npz`` with, per model NAME: ``NAME/input_ids`` [3, 10] and ``NAME/attention_mask`` (row 0 full,
row 1 left-padded by 3, row 2 right-padded by 2), ``NAME/logits`` (float32, eager attention, from
``model(input_ids, attention_mask=...)``: positions 0..T-1 as transformers' default), ``NAME/gen_prompt`` [2, 6],
``NAME/gen_mask`` (row 1 left-padded by 2), ``NAME/gen_tokens`` [2, 6 + 8] from
``generate(do_sample=False, max_new_tokens=8, eos_token_id=None)`` and ``NAME/gen_margin`` (the smallest gap
between the top-2 logits over the greedy steps: a flip needs an error that large).

``--check DIR``: load a folder written by ``jaxmodels.models.save_pretrained`` with ``AutoModelForCausalLM`` and
assert its logits on the reference inputs of the model it was saved from (``DIR/weightlab_source`` names it, or
the folder name) equal the reference to 1e-5: the transformers reload check of ``save_pretrained``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
NEW_TOKENS = 8


def configs():
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=64, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
    return {
        "llama": LlamaConfig(**{**common, "max_position_embeddings": 128}, num_key_value_heads=2, tie_word_embeddings=False, rope_theta=10000.0,
                             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
        "llama_tied": LlamaConfig(**common, num_key_value_heads=4, tie_word_embeddings=True, attention_bias=True,
                                  mlp_bias=True, rope_theta=1000.0,
                                  rope_scaling={"rope_type": "linear", "factor": 2.0}),
        "mistral": MistralConfig(**common, num_key_value_heads=2, head_dim=16, sliding_window=4,
                                 tie_word_embeddings=False, rope_theta=10000.0),
        "qwen2": Qwen2Config(**common, num_key_value_heads=2, tie_word_embeddings=False, rope_theta=10000.0,
                             use_sliding_window=False),
        "gpt2": GPT2Config(vocab_size=128, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=1,
                           eos_token_id=2),
    }


def randomize(model, torch):
    """Redraw every parameter (fixed by the global torch seed): norms near 1, small biases, matrices 0.15 N(0,1)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and ("norm" in name or "ln_" in name) and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(0.15 * torch.randn_like(p))


def inputs(rng, vocab):
    ids = rng.integers(3, vocab, size=(3, 10)).astype(np.int64)
    mask = np.ones((3, 10), np.int64)
    mask[1, :3] = 0
    mask[2, -2:] = 0
    ids[mask == 0] = 0
    prompt = rng.integers(3, vocab, size=(2, 6)).astype(np.int64)
    gmask = np.ones((2, 6), np.int64)
    gmask[1, :2] = 0
    prompt[gmask == 0] = 0
    return ids, mask, prompt, gmask


def reference_outputs(model, torch, ids, mask, prompt, gmask):
    with torch.no_grad():
        logits = model(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.float().numpy()
        out = model.generate(torch.tensor(prompt), attention_mask=torch.tensor(gmask), do_sample=False,
                             max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, eos_token_id=None,
                             pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    scores = torch.stack(out.scores).float()  # [steps, B, V]
    top2 = scores.topk(2, dim=-1).values
    margin = float((top2[..., 0] - top2[..., 1]).min())
    return logits, out.sequences.numpy(), margin


def build(out: Path) -> None:
    import safetensors
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    out.mkdir(parents=True, exist_ok=True)
    data = {}
    for name, cfg in configs().items():
        cfg._attn_implementation = "eager"
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
        randomize(model, torch)
        folder = out / name
        if folder.exists():
            shutil.rmtree(folder)
        model.save_pretrained(folder)
        (folder / "generation_config.json").unlink(missing_ok=True)
        ids, mask, prompt, gmask = inputs(rng, cfg.vocab_size)
        logits, tokens, margin = reference_outputs(model, torch, ids, mask, prompt, gmask)
        data.update({f"{name}/input_ids": ids, f"{name}/attention_mask": mask, f"{name}/logits": logits,
                     f"{name}/gen_prompt": prompt, f"{name}/gen_mask": gmask, f"{name}/gen_tokens": tokens,
                     f"{name}/gen_margin": np.float32(margin)})
        # reload from disk: the saved folder reproduces the logits
        again = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
        with torch.no_grad():
            l2 = again(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
        assert np.array_equal(l2, logits), name
        print(f"{name}: {sum(p.numel() for p in model.parameters())} params, greedy margin {margin:.3g}, "
              f"{(folder / 'model.safetensors').stat().st_size / 1024:.0f} KB")
        if name == "llama":
            sharded = out / "llama_sharded"
            if sharded.exists():
                shutil.rmtree(sharded)
            model.save_pretrained(sharded, max_shard_size="40KB")
            (sharded / "generation_config.json").unlink(missing_ok=True)
            print("llama_sharded:", sorted(p.name for p in sharded.iterdir()))
    versions = {"transformers": transformers.__version__, "torch": torch.__version__,
                "safetensors": safetensors.__version__, "numpy": np.__version__, "python": platform.python_version()}
    data["versions"] = np.array(json.dumps(versions))
    np.savez_compressed(out / "reference.npz", **data)
    print(versions)


def check(dirs: list[str], ref: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    data = np.load(ref)
    for d in dirs:
        d = Path(d)
        src = (d / "weightlab_source").read_text().strip() if (d / "weightlab_source").exists() else d.name
        model = AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager").eval()
        with torch.no_grad():
            logits = model(torch.tensor(data[f"{src}/input_ids"]),
                           attention_mask=torch.tensor(data[f"{src}/attention_mask"])).logits.float().numpy()
        valid = data[f"{src}/attention_mask"] > 0
        err = float(np.abs(logits - data[f"{src}/logits"])[valid].max())
        assert err <= 1e-5, (d, src, err)
        print(f"{d} (from {src}): transformers reload OK, max |logit error| {err:.2e}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "tests/data/hf"))
    ap.add_argument("--check", nargs="+", default=None, help="folders written by weightlab's save_pretrained")
    args = ap.parse_args()
    if args.check:
        check(args.check, Path(args.out) / "reference.npz")
    else:
        build(Path(args.out))


if __name__ == "__main__":
    main()
