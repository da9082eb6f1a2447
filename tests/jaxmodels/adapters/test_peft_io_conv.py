"""PEFT files for conv models: LoRA / DoRA on Conv layers (ViT patch embedding, ResNet convs) round-trip through
PEFT's tensor names and layouts (lora_A [r, in, kh, kw], lora_B [out, r, 1, 1], DoRA magnitude [1, out, 1, 1]),
and the torch-layout delta PEFT computes from them equals weightlab's merged delta."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodels.adapters import init_lora, merge
from jaxmodels.adapters.lora import LoraConfig
from jaxmodels.adapters.peft_io import NAME_MAPS, conv_from_peft, conv_to_peft, load_adapter, save_adapter
from jaxmodels.adapters import peft_io_conv  # noqa: F401 - registers the "vit" and "resnet" families
from jaxmodels.io import load_safetensors


def _vit_params(rng):
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    return {"patch_embed": {"kernel": f(2, 3, 3, 8), "bias": f(8)},
            "block_0": {"attn": {"query": {"kernel": f(8, 8), "bias": f(8)}}, "mlp": {"fc1": {"kernel": f(8, 16)}}}}


def _randomize(tree, rng):
    return jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape) + 1.0, jnp.float32), tree)


def peft_conv_delta_numpy(a_t, b_t, s):
    """PEFT's Conv2d get_delta_weight with a 1x1 lora_B: (B.squeeze(3).squeeze(2) @ A.flatten(1)).reshape(W)."""
    out, r = b_t.shape[:2]
    return s * (b_t[:, :, 0, 0].astype(np.float64) @ a_t.reshape(r, -1)).reshape(out, *a_t.shape[1:])


@pytest.mark.parametrize("dora", [False, True])
def test_vit_roundtrip_names_layouts_and_delta(tmp_path, dora):
    rng = np.random.default_rng(0)
    params = _vit_params(rng)
    cfg = LoraConfig(rank=4, alpha=8, target=r"^(patch_embed|block_0/attn/query|block_0/mlp/fc1)$", use_dora=dora,
                     rank_pattern={"fc1": 2})
    lora = _randomize(init_lora(jax.random.PRNGKey(0), params, cfg), rng)
    save_adapter(tmp_path / "a", lora, cfg, model_type="vit")
    st = load_safetensors(tmp_path / "a" / "adapter_model.safetensors")
    pre = "base_model.model.vit."
    conv = pre + "embeddings.patch_embeddings.projection"
    expect = {conv + ".lora_A.weight": (4, 3, 2, 3), conv + ".lora_B.weight": (8, 4, 1, 1),
              pre + "encoder.layer.0.attention.attention.query.lora_A.weight": (4, 8),
              pre + "encoder.layer.0.attention.attention.query.lora_B.weight": (8, 4),
              pre + "encoder.layer.0.intermediate.dense.lora_A.weight": (2, 8),
              pre + "encoder.layer.0.intermediate.dense.lora_B.weight": (16, 2)}
    if dora:
        expect[conv + ".lora_magnitude_vector"] = (1, 8, 1, 1)
        expect[pre + "encoder.layer.0.attention.attention.query.lora_magnitude_vector"] = (8,)
        expect[pre + "encoder.layer.0.intermediate.dense.lora_magnitude_vector"] = (16,)
    assert {k: tuple(v.shape) for k, v in st.items()} == expect
    raw = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert raw["use_dora"] is dora and raw["rank_pattern"] == {r"vit\.encoder\.layer\.0\.intermediate\.dense": 2}
    # PEFT's torch-layout delta from the stored tensors == weightlab's (kernel [kh, kw, in, out] -> [out, in, kh, kw])
    if not dora:
        ref = peft_conv_delta_numpy(np.asarray(st[conv + ".lora_A.weight"]), np.asarray(st[conv + ".lora_B.weight"]),
                                    2.0)
        got = np.asarray(merge(params, lora, cfg)["patch_embed"]["kernel"], np.float64)
        got = got - params["patch_embed"]["kernel"]
        np.testing.assert_allclose(got.transpose(3, 2, 0, 1), ref, rtol=1e-5, atol=1e-5)
    back, cfg2 = load_adapter(tmp_path / "a")  # family detected from the names
    jax.tree.map(np.testing.assert_array_equal, back, lora)
    assert cfg2.use_dora is dora and cfg2.rank_for("block_0/mlp/fc1") == 2 and cfg2.rank_for("patch_embed") == 4
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), merge(params, back, cfg2),
                 merge(params, lora, cfg))


def test_resnet_family_and_layout_helpers(tmp_path):
    rng = np.random.default_rng(1)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    params = {"stem_conv": {"kernel": f(3, 3, 1, 4)}, "block_0": {"conv1": {"kernel": f(3, 3, 4, 4)}},
              "head": {"kernel": f(4, 10), "bias": f(10)}}
    cfg = LoraConfig(rank=2, alpha=2, target=r"conv")
    lora = _randomize(init_lora(jax.random.PRNGKey(1), params, cfg), rng)
    save_adapter(tmp_path / "r", lora, cfg, model_type="resnet")
    names = set(load_safetensors(tmp_path / "r" / "adapter_model.safetensors"))
    assert names == {f"base_model.model.{m}.lora_{x}.weight" for m in ("stem_conv", "block_0.conv1") for x in "AB"}
    back, _ = load_adapter(tmp_path / "r", model_type="resnet")
    jax.tree.map(np.testing.assert_array_equal, back, lora)
    a, b, m = f(3, 2, 5, 4), f(4, 7), f(7)
    a_t, b_t, m_t = conv_to_peft(a, b, m)
    assert a_t.shape == (4, 5, 3, 2) and b_t.shape == (7, 4, 1, 1) and m_t.shape == (1, 7, 1, 1)
    assert a_t[1, 2, 0, 1] == a[0, 1, 2, 1]  # A_t[k, i, h, w] = A[h, w, i, k]
    for x, y in zip(conv_from_peft(a_t, b_t, m_t), (a, b, m)):
        np.testing.assert_array_equal(x, y)
    assert "vit" in NAME_MAPS and "resnet" in NAME_MAPS


def test_validation(tmp_path):
    with pytest.raises(ValueError, match="lora_A"):
        conv_to_peft(np.zeros((3, 3, 4)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="lora_magnitude"):
        conv_to_peft(np.zeros((3, 3, 4, 2)), np.zeros((2, 5)), np.zeros(4))
    with pytest.raises(ValueError, match=r"\[out, r, 1, 1\]"):
        conv_from_peft(np.zeros((2, 4, 3, 3)), np.zeros((5, 2, 3, 3)))
    bad = {"patch_embed": {"lora_A": jnp.zeros((1, 2, 2, 3, 4)), "lora_B": jnp.zeros((4, 8))}}
    with pytest.raises(ValueError, match="2-D-conv"):
        save_adapter(tmp_path / "x", bad, LoraConfig(rank=4), model_type="vit")


@pytest.mark.parametrize("name", ["conv_lora", "conv_dora"])
def test_peft_saved_conv_adapters_load_and_merge_as_peft_merges(name):
    """PEFT's own files (scripts/make_peft_reference.py --conv: torch 2.13.0+cpu, peft 0.21.2) for LoRA / DoRA on
    three nn.Conv2d (3x3 and 1x1) of a net named like ResNet: load_adapter + merge_adapter on the base kernels give
    the kernels of PEFT's merge_and_unload."""
    from jaxmodels.adapters import merge_adapter
    from tests.jaxmodels.adapters.test_peft import DATA  # tests/data/peft

    d = DATA / name
    lora, cfg = load_adapter(d, model_type="resnet")
    assert cfg.use_dora == (name == "conv_dora") and cfg.rank == 4 and cfg.alpha == 8
    base, want = np.load(d / "base.npz"), np.load(d / "merged.npz")
    linen = {"stem_conv": "stem_conv", "block_0.conv1": "block_0/conv1",
             "block_0.shortcut_conv": "block_0/shortcut_conv"}
    params = {}
    for hf, path in linen.items():
        node = params
        for k in path.split("/")[:-1]:
            node = node.setdefault(k, {})
        node[path.split("/")[-1]] = {"kernel": jnp.asarray(base[hf].transpose(2, 3, 1, 0))}  # [kh, kw, in, out]
    merged = merge_adapter(params, lora, cfg)
    for hf, path in linen.items():
        got = merged
        for k in path.split("/"):
            got = got[k]
        # float32 on both sides, different summation orders: measured max abs difference 6e-8 (LoRA), 4.5e-8 (DoRA)
        np.testing.assert_allclose(np.asarray(got["kernel"]).transpose(3, 2, 0, 1), want[hf], rtol=1e-6, atol=1e-6)
        assert not np.allclose(want[hf], base[hf])  # the adapter really changes every kernel
