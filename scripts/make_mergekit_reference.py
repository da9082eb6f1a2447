"""Regenerate tests/data/mergekit/: tiny random Llama-shaped checkpoints, mergekit configs, and the tensors mergekit
writes for them (the reference that tests/merging/test_mergekit_parity.py compares `python -m merging` against).

Run OUTSIDE the project venv, in a throwaway venv with mergekit (never install torch/mergekit into .venv)::

    python3 -m venv /tmp/mkenv && /tmp/mkenv/bin/pip install torch==2.13.0 mergekit
    /tmp/mkenv/bin/python scripts/make_mergekit_reference.py

Generated with mergekit 0.1.5, torch 2.13.0+cpu, safetensors 0.8.0 (recorded in tests/data/mergekit/VERSIONS.json).
Only deterministic methods (or random ones at density 1) can be compared tensor for tensor: mergekit draws its
DARE/DELLA masks from torch's RNG.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

ROOT = Path(__file__).resolve().parents[1] / "tests" / "data" / "mergekit"
H, I, L, V, HEADS = 16, 24, 3, 32, 2

LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H, "intermediate_size": I,
    "num_hidden_layers": L, "num_attention_heads": HEADS, "num_key_value_heads": HEADS, "vocab_size": V,
    "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "torch_dtype": "float32",
    "hidden_act": "silu", "rope_theta": 10000.0,
}


def llama_shapes():
    s = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,), "lm_head.weight": (V, H)}
    for i in range(L):
        p = f"model.layers.{i}."
        s.update({p + "self_attn.q_proj.weight": (H, H), p + "self_attn.k_proj.weight": (H, H),
                  p + "self_attn.v_proj.weight": (H, H), p + "self_attn.o_proj.weight": (H, H),
                  p + "mlp.gate_proj.weight": (I, H), p + "mlp.up_proj.weight": (I, H),
                  p + "mlp.down_proj.weight": (H, I), p + "input_layernorm.weight": (H,),
                  p + "post_attention_layernorm.weight": (H,)})
    return s


CONFIGS = {
    "linear": """
merge_method: linear
models:
  - model: m0
    parameters: {weight: 0.3}
  - model: m1
    parameters: {weight: 0.5}
  - model: m2
    parameters: {weight: [{filter: mlp, value: 0.1}, {value: 0.9}]}
dtype: float32
""",
    "linear_unnormalized": """
merge_method: linear
models:
  - model: m0
    parameters: {weight: 0.3}
  - model: m1
    parameters: {weight: 0.5}
parameters: {normalize: false}
dtype: float32
""",
    "task_arithmetic": """
merge_method: task_arithmetic
base_model: base
models:
  - model: m0
    parameters: {weight: 1.0}
  - model: m1
    parameters: {weight: -0.5}
  - model: m2
    parameters: {weight: 0.7}
parameters: {lambda: 0.8}
dtype: float32
""",
    "ties": """
merge_method: ties
base_model: base
models:
  - model: m0
    parameters: {weight: 1.0, density: 0.5}
  - model: m1
    parameters:
      weight: [{filter: self_attn, value: 0.4}, {value: 0.8}]
      density: 0.3
  - model: m2
    parameters: {weight: 0.6, density: 0.7}
parameters: {normalize: true, int8_mask: true}
dtype: float32
""",
    "ties_rescale_unnormalized": """
merge_method: ties
base_model: base
models:
  - model: m0
    parameters: {weight: 1.0, density: 0.4}
  - model: m1
    parameters: {weight: 0.5, density: 0.6}
parameters: {normalize: false, rescale: true}
dtype: float32
""",
    "breadcrumbs": """
merge_method: breadcrumbs
base_model: base
models:
  - model: m0
    parameters: {weight: 1.0, density: 0.6, gamma: 0.05}
  - model: m1
    parameters: {weight: 0.5, density: 0.6, gamma: 0.05}
dtype: float32
""",
    "breadcrumbs_ties": """
merge_method: breadcrumbs_ties
base_model: base
models:
  - model: m0
    parameters: {weight: 1.0, density: 0.5, gamma: 0.1}
  - model: m1
    parameters: {weight: 0.7, density: 0.5, gamma: 0.1}
  - model: m2
    parameters: {weight: 0.7, density: 0.5, gamma: 0.1}
parameters: {normalize: true}
dtype: float32
""",
    "dare_ties_density1": """
merge_method: dare_ties
base_model: base
models:
  - model: m0
    parameters: {weight: 0.5, density: 1.0}
  - model: m1
    parameters: {weight: 0.5, density: 1.0}
dtype: float32
""",
    "slerp": """
merge_method: slerp
base_model: m0
models:
  - model: m0
  - model: m1
parameters:
  t: [{filter: mlp, value: 0.7}, {value: 0.3}]
dtype: float32
""",
    "nuslerp": """
merge_method: nuslerp
models:
  - model: m0
    parameters: {weight: 0.4}
  - model: m1
    parameters: {weight: 0.6}
parameters: {nuslerp_flatten: false, nuslerp_row_wise: true}
dtype: float32
""",
    "nuslerp_base": """
merge_method: nuslerp
base_model: base
models:
  - model: m0
    parameters: {weight: 1.0}
  - model: m1
    parameters: {weight: 2.0}
dtype: float32
""",
    "model_stock": """
merge_method: model_stock
base_model: base
models:
  - model: m0
  - model: m1
  - model: m2
dtype: float32
""",
    "model_stock_filter_wise": """
merge_method: model_stock
base_model: base
models:
  - model: m0
  - model: m1
  - model: m2
parameters: {filter_wise: true}
dtype: float32
""",
}


def main():
    import mergekit
    import safetensors
    import torch

    if ROOT.exists():
        shutil.rmtree(ROOT)
    ROOT.mkdir(parents=True)
    rng = np.random.default_rng(0)
    shapes = llama_shapes()
    base = {k: (0.5 * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}
    models = {"base": base}
    for i in range(3):
        models[f"m{i}"] = {k: (v + 0.05 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in base.items()}
    for name, tensors in models.items():
        d = ROOT / name
        d.mkdir()
        save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps(LLAMA_CONFIG, indent=1))
    (ROOT / "configs").mkdir()
    (ROOT / "expected").mkdir()
    for name, text in CONFIGS.items():
        cfg = ROOT / "configs" / f"{name}.yaml"
        # model paths are relative to the data folder; mergekit resolves them against its working directory
        cfg.write_text(text.lstrip())
        out = ROOT / "expected" / name
        # mergekit gets absolute model paths (a bare relative name would be taken for a Hugging Face repo id)
        abs_text = text
        for m in models:
            abs_text = abs_text.replace(f"model: {m}\n", f"model: {ROOT / m}\n")
            abs_text = abs_text.replace(f"base_model: {m}\n", f"base_model: {ROOT / m}\n")
        tmp_cfg = Path("/tmp") / f"mergekit_ref_{name}.yaml"
        tmp_cfg.write_text(abs_text)
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        subprocess.run([str(Path(sys.executable).parent / "mergekit-yaml"), str(tmp_cfg), str(out), "--quiet",
                        "--no-copy-tokenizer"],
                       cwd=ROOT, check=True, env=env)
        # keep only the tensors (drop config.json / README the merge writes)
        for f in out.iterdir():
            if not f.name.endswith(".safetensors"):
                f.unlink()
    (ROOT / "VERSIONS.json").write_text(json.dumps({
        "mergekit": mergekit.__version__ if hasattr(mergekit, "__version__") else
        __import__("importlib.metadata").metadata.version("mergekit"),
        "torch": torch.__version__, "safetensors": safetensors.__version__, "numpy": np.__version__}, indent=1))
    total = sum(f.stat().st_size for f in ROOT.rglob("*") if f.is_file())
    print(f"wrote {ROOT} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
