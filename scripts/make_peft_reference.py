"""PEFT parity fixtures for ``jaxmodels.adapters`` (tests/jaxmodels/adapters/test_peft.py,
tests/merging/test_lora_merge.py).

Run with the throwaway environment (never a project dependency)::

    /tmp/mkenv/bin/python scripts/make_peft_reference.py            # writes tests/data/peft/
    /tmp/mkenv/bin/python scripts/make_peft_reference.py --extra    # adds the GPT-2 / embedding-DoRA fixtures
    /tmp/mkenv/bin/python scripts/make_peft_reference.py --check    # loads OUR saved adapters in PEFT
    /tmp/mkenv/bin/python scripts/make_peft_reference.py --conv     # adds the Conv2d LoRA / DoRA fixtures

Versions used: torch 2.13.0+cpu, transformers 5.24.0, peft 0.21.2 (also written to tests/data/peft/VERSIONS.json).

Generate mode (torch seed 0, float32, eager attention):
- ``llama/``: a tiny random ``LlamaForCausalLM`` (vocab 64, hidden 16, 2 layers, 4 heads / 2 kv heads, untied).
- ``lora/``: PEFT LoRA (r=4, lora_alpha=8) on q_proj, v_proj, down_proj and embed_tokens with non-zero B (and
  embedding A) drawn from the seed; ``dora/``: DoRA + rsLoRA (r=4, lora_alpha=4) on q/k/o/gate/up_proj with
  non-zero B and perturbed magnitudes. Each holds PEFT's own ``save_pretrained`` files and ``logits.npy`` (the
  PEFT model's logits on ``input_ids.npy``).
- ``m0/``, ``m1/``: two LoRAs (r=4, alphas 8 and 4) on q_proj/v_proj; ``weighted.npz``: PEFT's
  ``add_weighted_adapter(["m0", "m1"], [0.7, -0.5], ...)`` factors for every combination type (density 0.5 for
  ties / magnitude_prune; dare_* at density 1.0 because torch's Bernoulli mask cannot be reproduced; svd rank 3),
  keys ``<combination>/<hf module>/lora_A`` ([r, in], torch layout) and ``.../lora_B`` ([out, r]).

Extra mode (``--extra``; adds fixtures, rewrites none of the above):
- ``gpt2_lora/``: LoRA (r=4, lora_alpha=8) on the tiny random GPT-2 of ``tests/data/hf/gpt2`` (Conv1D c_attn,
  c_proj, c_fc: PEFT's ``fan_in_fan_out=True``) and on its tied ``wte``; ``logits.npy`` is PEFT's unmerged forward,
  ``logits_merged.npy`` the forward after ``merge_and_unload`` (they differ: PEFT's unmerged forward adds the
  embedding delta to the lookup only, not to the tied head; merged, the head sees it too).
- ``gpt2_dora/``: DoRA (r=4, lora_alpha=8) on c_attn, c_fc, the attention c_proj and ``wpe`` (an untied embedding).
- ``dora_embed/``: DoRA (r=4, lora_alpha=8) on the tiny Llama's ``embed_tokens``, ``v_proj`` and untied ``lm_head``.

Conv mode (``--conv``; adds fixtures, rewrites none of the above): ``conv_lora/`` (LoRA r=4, lora_alpha=8) and
``conv_dora/`` (DoRA r=4, lora_alpha=8, perturbed magnitudes) on the three ``nn.Conv2d`` of a tiny torch net named
like :class:`jaxmodels.models.ResNet` (``stem_conv`` 3→8 3x3, ``block_0.conv1`` 8→8 3x3, ``block_0.shortcut_conv``
8→16 1x1; the ``"resnet"`` family of ``jaxmodels.adapters.peft_io_conv``), non-zero B and A from torch seed 0. Each
holds PEFT's ``save_pretrained`` files, ``base.npz`` (the base kernels, torch layout ``[out, in, kh, kw]``) and
``merged.npz`` (the kernels after PEFT's ``merge_and_unload``).

Check mode: for ``ours_lora/``, ``ours_dora/`` and ``ours_gpt2_dora/`` (written by
``jaxmodels.adapters.save_adapter`` in the test
``test_peft.py::test_write_ours`` with ``WEIGHTLAB_WRITE_PEFT_FIXTURES=1``), load the base and the adapter with
``PeftModel.from_pretrained`` and compare its logits with the ``logits.npy`` our forward wrote there; the result
(max abs difference, pass) goes to ``tests/data/peft/peft_check.json``.
"""

import json
import sys
from pathlib import Path

import numpy as np
import peft
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "peft"
GPT2 = OUT.parent / "hf" / "gpt2"
COMBINATIONS = ["linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
                "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd"]


def base_model():
    return LlamaForCausalLM.from_pretrained(OUT / "llama", attn_implementation="eager", dtype=torch.float32).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids)).logits.float().numpy()


def randomize(model, gen, magnitude=False):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding" in name or "lora_A" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
            elif magnitude and "lora_magnitude_vector" in name:
                p.mul_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))


def generate():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                      tie_word_embeddings=False, rms_norm_eps=1e-6)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(OUT / "llama", safe_serialization=True)
    ids = np.random.default_rng(0).integers(0, 64, size=(2, 8)).astype(np.int64)
    np.save(OUT / "input_ids.npy", ids)
    np.save(OUT / "llama" / "logits.npy", logits(base_model(), ids))
    gen = torch.Generator().manual_seed(1)
    for name, kw in [
        ("lora", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"])),
        ("dora", dict(r=4, lora_alpha=4, use_rslora=True, use_dora=True,
                      target_modules=["q_proj", "k_proj", "o_proj", "gate_proj", "up_proj"])),
        ("m0", dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])),
        ("m1", dict(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"])),
    ]:
        pm = get_peft_model(base_model(), LoraConfig(lora_dropout=0.0, **kw))
        randomize(pm, gen, magnitude=kw.get("use_dora", False))
        pm.eval()
        pm.save_pretrained(OUT / name, save_embedding_layers=False)
        (OUT / name / "README.md").unlink(missing_ok=True)
        cfg_file = OUT / name / "adapter_config.json"  # no absolute path of this machine in the fixture
        cfg_file.write_text(cfg_file.read_text().replace(str(OUT / "llama"), "tests/data/peft/llama"))
        np.save(OUT / name / "logits.npy", logits(pm, ids))
    pm = PeftModel.from_pretrained(base_model(), OUT / "m0", adapter_name="m0")
    pm.load_adapter(OUT / "m1", adapter_name="m1")
    out = {}
    for comb in COMBINATIONS:
        density = 1.0 if comb.startswith("dare") else (0.5 if comb not in ("linear", "cat", "svd") else None)
        kw = dict(svd_rank=3) if comb.endswith("svd") else {}
        pm.add_weighted_adapter(["m0", "m1"], [0.7, -0.5], comb, combination_type=comb, density=density, **kw)
        for mod_name, mod in pm.named_modules():
            if hasattr(mod, "lora_A") and comb in mod.lora_A:
                key = mod_name.removeprefix("base_model.model.")
                out[f"{comb}/{key}/lora_A"] = mod.lora_A[comb].weight.detach().numpy()
                out[f"{comb}/{key}/lora_B"] = mod.lora_B[comb].weight.detach().numpy()
                out[f"{comb}/{key}/scaling"] = np.float32(mod.scaling[comb])
    np.savez(OUT / "weighted.npz", **out)
    (OUT / "VERSIONS.json").write_text(json.dumps(
        {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}, indent=1))


def gpt2_model():
    return GPT2LMHeadModel.from_pretrained(GPT2, attn_implementation="eager", dtype=torch.float32).eval()


def extra():
    ids = np.load(OUT / "input_ids.npy")
    gen = torch.Generator().manual_seed(2)
    for name, make, base_path, kw in [
        ("gpt2_lora", gpt2_model, GPT2, dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc", "wte"])),
        ("gpt2_dora", gpt2_model, GPT2, dict(r=4, lora_alpha=8, use_dora=True,
                                             target_modules=r".*(attn\.c_attn|attn\.c_proj|mlp\.c_fc|wpe)")),
        ("dora_embed", base_model, OUT / "llama", dict(r=4, lora_alpha=8, use_dora=True,
                                                       target_modules=["embed_tokens", "v_proj", "lm_head"])),
    ]:
        pm = get_peft_model(make(), LoraConfig(lora_dropout=0.0, **kw))
        randomize(pm, gen, magnitude=kw.get("use_dora", False))
        pm.eval()
        pm.save_pretrained(OUT / name, save_embedding_layers=False)
        (OUT / name / "README.md").unlink(missing_ok=True)
        cfg_file = OUT / name / "adapter_config.json"
        cfg_file.write_text(cfg_file.read_text().replace(str(base_path), _rel(base_path)))
        np.save(OUT / name / "logits.npy", logits(pm, ids))
        np.save(OUT / name / "logits_merged.npy", logits(pm.merge_and_unload(), ids))
    (OUT / "VERSIONS.json").write_text(json.dumps(
        {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}, indent=1))


class ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem_conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.block_0 = torch.nn.Module()
        self.block_0.conv1 = torch.nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.block_0.shortcut_conv = torch.nn.Conv2d(8, 16, 1, bias=False)

    def forward(self, x):
        h = self.block_0.conv1(self.stem_conv(x))
        return self.block_0.shortcut_conv(h)


CONV_MODULES = ["stem_conv", "block_0.conv1", "block_0.shortcut_conv"]


def conv():
    for name, dora in (("conv_lora", False), ("conv_dora", True)):
        torch.manual_seed(0)
        net = ConvNet().eval()
        base = {m: net.get_submodule(m).weight.detach().numpy().copy() for m in CONV_MODULES}
        pm = get_peft_model(net, LoraConfig(r=4, lora_alpha=8, target_modules=CONV_MODULES, use_dora=dora))
        randomize(pm, torch.Generator().manual_seed(1), magnitude=dora)
        d = OUT / name
        pm.save_pretrained(d)
        merged = pm.merge_and_unload()
        np.savez(d / "base.npz", **base)
        np.savez(d / "merged.npz", **{m: merged.get_submodule(m).weight.detach().numpy() for m in CONV_MODULES})
    (OUT / "VERSIONS.json").write_text(json.dumps(
        {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}, indent=1))


def _rel(path):
    return str(Path(path).relative_to(OUT.parents[2]))


def check():
    ids = np.load(OUT / "input_ids.npy")
    result = {}
    for name in ("ours_lora", "ours_dora", "ours_gpt2_dora"):
        make = gpt2_model if "gpt2" in name else base_model
        pm = PeftModel.from_pretrained(make(), OUT / name).eval()
        got = logits(pm, ids)
        want = np.load(OUT / name / "logits.npy")
        diff = float(np.abs(got - want).max())
        result[name] = {"max_abs_diff": diff, "pass": diff <= 1e-5}
    result["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                          "peft": peft.__version__}
    (OUT / "peft_check.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    if "--check" in sys.argv:
        check()
    elif "--extra" in sys.argv:
        extra()
    elif "--conv" in sys.argv:
        conv()
    else:
        generate()
