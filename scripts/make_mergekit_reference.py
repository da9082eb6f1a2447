"""Regenerate tests/data/mergekit/: tiny random Llama-shaped checkpoints, mergekit configs, and the tensors mergekit
writes for them (the reference that tests/merging/test_cli.py::test_cli_reproduces_mergekit_outputs compares
`python -m merging` against).

Run OUTSIDE the project venv, in a throwaway venv with mergekit (never install torch/mergekit into .venv)::

    python3 -m venv /tmp/mkenv && /tmp/mkenv/bin/pip install torch==2.13.0 mergekit
    /tmp/mkenv/bin/python scripts/make_mergekit_reference.py

Generated with mergekit 0.1.5, torch 2.13.0+cpu, safetensors 0.8.0 (recorded in tests/data/mergekit/VERSIONS.json).
Two families: ``base, m0..m2`` (float32, H=16) and ``bf16/base, bf16/m0, bf16/m1`` (bfloat16, with a 2048 x 16
embedding: 32768 entries, above the 2^14-entry radix-select threshold; bf16 deltas tie constantly).

mergekit runs in a child process of this script (``--child``) with two patches, both recorded here:

- torch.sort / torch.argsort are made ``stable=True``. mergekit calls them with the default unstable sort, whose
  order among equal magnitudes is an implementation detail of torch (on CPU not index order); weightlab documents
  index order (a stable sort). With the patch the fixtures pin the exact kept set on tied bf16 deltas.
- DARE / DELLA masks: mergekit draws them with ``torch.bernoulli``; for the ``*_mask`` configs the draw returns a
  mask generated here with NumPy and saved as ``masks/<config>.safetensors`` (``np.packbits`` of the flat mask per
  ``"<tensor>|<model>"``). The test feeds the same mask to weightlab (its uniforms become 0 where kept, 1 where
  dropped), so DARE/DELLA at density < 1 are compared given the mask.
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


BF16_V, BF16_L = 2048, 1
BF16_CONFIG = dict(LLAMA_CONFIG, vocab_size=BF16_V, num_hidden_layers=BF16_L, torch_dtype="bfloat16")

# bf16 family, partial per-model parameters (mergekit fills density 1.0 / gamma 0.01 / epsilon 0.15), and masks
EXTRA_CONFIGS = {
    "ties_bf16": """
merge_method: ties
base_model: bf16/base
models:
  - model: bf16/m0
    parameters: {weight: 1.0, density: 0.3}
  - model: bf16/m1
    parameters: {weight: 0.6, density: 0.7}
dtype: float32
out_dtype: bfloat16
""",
    "breadcrumbs_ties_bf16": """
merge_method: breadcrumbs_ties
base_model: bf16/base
models:
  - model: bf16/m0
    parameters: {weight: 1.0, density: 0.5, gamma: 0.1}
  - model: bf16/m1
    parameters: {weight: 0.7, density: 0.4}
parameters: {normalize: true}
dtype: float32
out_dtype: bfloat16
""",
    "dare_ties_bf16_mask": """
merge_method: dare_ties
base_model: bf16/base
models:
  - model: bf16/m0
    parameters: {weight: 1.0, density: 0.3}
  - model: bf16/m1
    parameters: {weight: 0.5, density: 0.6}
dtype: float32
out_dtype: bfloat16
""",
    "della_bf16_mask": """
merge_method: della
base_model: bf16/base
models:
  - model: bf16/m0
    parameters: {weight: 1.0, density: 0.5, epsilon: 0.1}
  - model: bf16/m1
    parameters: {weight: 0.8, density: 0.4}
dtype: float32
out_dtype: bfloat16
""",
    "ties_partial": """
merge_method: ties
base_model: base
models:
  - model: m0
    parameters: {weight: 1.0, density: 0.5}
  - model: m1
    parameters: {weight: 0.8}
  - model: m2
    parameters: {weight: 0.6, density: [{filter: mlp, value: 0.2}]}
dtype: float32
""",
    "dare_linear_mask": """
merge_method: dare_linear
base_model: base
models:
  - model: m0
    parameters: {weight: 1.0, density: 0.4}
  - model: m1
    parameters: {weight: 0.5, density: 0.7}
dtype: float32
""",
    "della_linear_partial_mask": """
merge_method: della_linear
base_model: base
models:
  - model: m0
    parameters: {weight: 1.0, density: 0.5, epsilon: 0.2}
  - model: m1
    parameters: {weight: 0.5, density: 0.6}
  - model: m2
    parameters: {weight: 0.3}
dtype: float32
""",
}
CONFIGS.update(EXTRA_CONFIGS)
MASK_DENSITY = 0.5  # the given masks: Bernoulli(0.5) per entry (any mask works: the comparison is given the mask)


def _child(cfg, out, mask_file):
    """Run mergekit-yaml in this process with the stable-sort and given-mask patches (module docstring)."""
    import re

    import torch

    _sort, _argsort = torch.sort, torch.argsort
    torch.sort = lambda input, dim=-1, descending=False, stable=None: _sort(input, dim=dim, descending=descending,
                                                                           stable=True)
    torch.argsort = lambda input, dim=-1, descending=False, stable=None: _argsort(input, dim=dim,
                                                                                 descending=descending, stable=True)
    masks = None
    if mask_file != "-":
        from safetensors.numpy import load_file
        masks = load_file(mask_file)
    import mergekit.merge_methods.generalized_task_arithmetic as G

    ctx = {}
    orig_group, orig_sparsify = G.GeneralizedTaskArithmeticMerge.merge_group, G.sparsify

    def merge_group(self, group, /, **parameters):
        ctx["name"] = group.metadata.name
        ctx["models"] = [re.findall(r"(m\d+)", str(e.id))[-1] for e in group.non_base]
        ctx["i"] = 0
        return orig_group(self, group, **parameters)

    def sparsify(tensor, **kw):
        ctx["cur"] = ctx["models"][ctx["i"]]
        ctx["i"] += 1
        return orig_sparsify(tensor, **kw)

    def bernoulli(p, *a, **k):
        if masks is None:
            raise RuntimeError("a random draw in a config without given masks")
        packed = masks[f"{ctx['name']}|{ctx['cur']}"]
        m = np.unpackbits(packed, count=p.numel()).astype(np.float32).reshape(tuple(p.shape))
        return torch.from_numpy(m).to(p.dtype)

    G.GeneralizedTaskArithmeticMerge.merge_group = merge_group
    G.sparsify = sparsify
    torch.bernoulli = bernoulli
    from mergekit.scripts.run_yaml import main as run_yaml

    sys.argv = ["mergekit-yaml", cfg, out, "--quiet", "--no-copy-tokenizer"]
    try:
        run_yaml()
    except SystemExit as e:
        if e.code:
            raise


def bf16_shapes():
    s = {"model.embed_tokens.weight": (BF16_V, H), "model.norm.weight": (H,), "lm_head.weight": (32, H)}
    for i in range(BF16_L):
        p = f"model.layers.{i}."
        s.update({p + "self_attn.q_proj.weight": (H, H), p + "self_attn.k_proj.weight": (H, H),
                  p + "self_attn.v_proj.weight": (H, H), p + "self_attn.o_proj.weight": (H, H),
                  p + "mlp.gate_proj.weight": (I, H), p + "mlp.up_proj.weight": (I, H),
                  p + "mlp.down_proj.weight": (H, I), p + "input_layernorm.weight": (H,),
                  p + "post_attention_layernorm.weight": (H,)})
    return s


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return _child(*sys.argv[2:5])
    import ml_dtypes
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
    # bf16 family: base ~N(0, 0.02^2), fine-tunes + N(0, 1e-3^2), rounded to bf16 (few distinct delta values)
    bshapes = bf16_shapes()
    bbase = {k: (0.02 * rng.standard_normal(s)).astype(np.float32) for k, s in bshapes.items()}
    bmodels = {"base": bbase}
    for i in range(2):
        bmodels[f"m{i}"] = {k: v + 1e-3 * rng.standard_normal(v.shape) for k, v in bbase.items()}
    bf16_trees = {}
    for name, tensors in bmodels.items():
        d = ROOT / "bf16" / name
        d.mkdir(parents=True)
        bf16_trees[name] = {k: np.asarray(v).astype(ml_dtypes.bfloat16) for k, v in tensors.items()}
        save_file(bf16_trees[name], str(d / "model.safetensors"), metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps(BF16_CONFIG, indent=1))
    (ROOT / "masks").mkdir()
    (ROOT / "configs").mkdir()
    (ROOT / "expected").mkdir()
    for name, text in CONFIGS.items():
        cfg = ROOT / "configs" / f"{name}.yaml"
        # model paths are relative to the data folder; mergekit resolves them against its working directory
        cfg.write_text(text.lstrip())
        out = ROOT / "expected" / name
        # mergekit gets absolute model paths (a bare relative name would be taken for a Hugging Face repo id)
        abs_text = text
        for m in list(models) + [f"bf16/{m}" for m in bmodels]:
            abs_text = abs_text.replace(f"model: {m}\n", f"model: {ROOT / m}\n")
            abs_text = abs_text.replace(f"base_model: {m}\n", f"base_model: {ROOT / m}\n")
        mask_file = "-"
        if name.endswith("_mask"):  # one mask per (tensor, non-base model), from a NumPy generator
            fam = bf16_trees if "bf16/" in text else models
            labels = [m for m in ("m0", "m1", "m2") if f"model: {'bf16/' if fam is bf16_trees else ''}{m}\n" in text]
            mrng = np.random.default_rng(sum(map(ord, name)))
            masks = {f"{t}|{m}": np.packbits(mrng.random(v.size) < MASK_DENSITY)
                     for t, v in fam["base"].items() for m in labels}
            mask_file = str(ROOT / "masks" / f"{name}.safetensors")
            save_file(masks, mask_file)
        tmp_cfg = Path("/tmp") / f"mergekit_ref_{name}.yaml"
        tmp_cfg.write_text(abs_text)
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(tmp_cfg), str(out), mask_file],
                       cwd=ROOT, check=True, env=env)
        # keep only the tensors (drop config.json / README the merge writes)
        for f in out.iterdir():
            if not f.name.endswith(".safetensors"):
                f.unlink()
    (ROOT / "VERSIONS.json").write_text(json.dumps({
        "mergekit": mergekit.__version__ if hasattr(mergekit, "__version__") else
        __import__("importlib.metadata").metadata.version("mergekit"),
        "torch": torch.__version__, "safetensors": safetensors.__version__, "numpy": np.__version__,
        "ml_dtypes": ml_dtypes.__version__,
        "patches": "torch.sort/argsort stable=True; *_mask configs: torch.bernoulli returns masks/<config>"}, indent=1))
    total = sum(f.stat().st_size for f in ROOT.rglob("*") if f.is_file())
    print(f"wrote {ROOT} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
