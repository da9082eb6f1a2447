"""load_pretrained / save_pretrained on the Hugging Face folders in tests/data/hf (scripts/make_hf_reference.py).

transformers reload of save_pretrained's output: ``scripts/make_hf_reference.py --check DIR...`` loads folders
written by :func:`save_pretrained` with ``AutoModelForCausalLM`` and compares its logits to the reference (run for
all five architectures with transformers 5.24.0: max error 0). Here the same is checked without torch: the saved
file holds exactly the tensor names, shapes and bytes transformers itself wrote.
"""

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxmodels.io import CheckpointError
from jaxmodels.models import LLAMA_RULES_TP, Llama, load_pretrained, save_pretrained
from jaxmodels.tree import flatten

DATA = Path(__file__).resolve().parents[2] / "data" / "hf"
NAMES = ["llama", "llama_tied", "mistral", "qwen2", "gpt2"]


def _same(a, b):
    fa, fb = flatten(a), flatten(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert fa[k].dtype == fb[k].dtype, k
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


@pytest.mark.parametrize("name", NAMES)
def test_save_reload_bit_exact_and_hf_layout(name, tmp_path):
    model, params = load_pretrained(DATA / name, progress=False)
    before = jax.tree.map(np.array, params)
    out = save_pretrained(tmp_path / name, model, params, progress=False)
    model2, params2 = load_pretrained(out, progress=False)
    assert model2 == model
    _same(params2, params)
    _same(params, before)  # inputs untouched
    # the file transformers wrote and ours: same names, shapes, bytes (tied heads are not stored by either)
    theirs, ours = load_file(DATA / name / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(theirs) == sorted(ours)
    for k in theirs:
        np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
    raw = json.loads((out / "config.json").read_text())
    assert raw["model_type"] == model.config.model_type and raw["architectures"]


def test_sharded_index_folder_equals_single_file():
    assert (DATA / "llama_sharded" / "model.safetensors.index.json").exists()
    m1, p1 = load_pretrained(DATA / "llama", progress=False)
    m2, p2 = load_pretrained(DATA / "llama_sharded", progress=False)
    assert m1 == m2
    _same(p1, p2)


def test_shardings_as_pytree_single_and_rules(mesh_2d):
    model, ref = load_pretrained(DATA / "llama", progress=False)
    from jaxmodels.sharding import rules_to_shardings

    tree = rules_to_shardings(ref, LLAMA_RULES_TP, mesh_2d)
    _, p = load_pretrained(DATA / "llama_sharded", shardings=tree, progress=False)  # index + shards + sharding
    for a, s in zip(jax.tree.leaves(p), jax.tree.leaves(tree)):
        assert a.sharding == s
    _same(p, ref)  # each device holds its slice of the (transposed) tensor: gathered, bit-equal
    rep = jax.sharding.NamedSharding(mesh_2d, jax.sharding.PartitionSpec())
    _, p = load_pretrained(DATA / "gpt2", shardings=rep, progress=False)
    assert all(a.sharding == rep for a in jax.tree.leaves(p))
    with pytest.raises(ValueError, match="mesh"):
        load_pretrained(DATA / "llama", shardings=LLAMA_RULES_TP)
    with pytest.raises(ValueError, match="no entry"):
        load_pretrained(DATA / "llama", shardings={"embed_tokens": {"embedding": rep}})


def test_bf16_load_and_save(tmp_path):
    model, p32 = load_pretrained(DATA / "llama_tied", progress=False)
    model, p16 = load_pretrained(DATA / "llama_tied", dtype=jnp.bfloat16, progress=False)
    assert {a.dtype for a in jax.tree.leaves(p16)} == {jnp.dtype(jnp.bfloat16)}
    _same(p16, jax.tree.map(lambda a: a.astype(jnp.bfloat16), p32))  # round-to-nearest of the float32 tensor
    r = np.load(DATA / "reference.npz")
    logits = jax.jit(lambda p: model.apply({"params": p}, r["llama_tied/input_ids"],
                                           r["llama_tied/attention_mask"]))(p16)
    assert logits.dtype == jnp.float32
    valid = r["llama_tied/attention_mask"] > 0
    ref = r["llama_tied/logits"][valid]
    err = np.abs(np.asarray(logits)[valid] - ref).max() / np.abs(ref).max()
    assert err < 0.05, err  # bf16 end to end (8-bit mantissa through 2 layers): measured ~1e-2 of the logit scale
    out = save_pretrained(tmp_path / "bf16", model, p16, progress=False)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    _, again = load_pretrained(out, progress=False)
    _same(again, p16)


def test_gpt2_names_without_prefix_and_buffers(tmp_path):
    """The original GPT-2 checkpoints name tensors without ``transformer.`` and carry ``attn.bias`` mask buffers;
    a tied Llama may still store ``lm_head.weight``: all load as the canonical folder."""
    f = _copy("gpt2", tmp_path)
    _edit_tensors(f, lambda t: t.update({**{k.removeprefix("transformer."): t.pop(k) for k in list(t)},
                                         "h.0.attn.bias": np.tril(np.ones((1, 1, 64, 64), np.float32))}))
    _same(load_pretrained(f, progress=False)[1], load_pretrained(DATA / "gpt2", progress=False)[1])
    f = _copy("llama_tied", tmp_path)
    _edit_tensors(f, lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].copy()}))
    _same(load_pretrained(f, progress=False)[1], load_pretrained(DATA / "llama_tied", progress=False)[1])


def _copy(name, tmp_path):
    dst = tmp_path / name
    shutil.copytree(DATA / name, dst)
    return dst


def _edit_config(folder, **kw):
    raw = json.loads((folder / "config.json").read_text())
    raw.update(kw)
    (folder / "config.json").write_text(json.dumps(raw))


def _edit_tensors(folder, fn):
    tensors = load_file(folder / "model.safetensors")
    fn(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def test_errors_name_the_problem(tmp_path):
    f = _copy("llama", tmp_path)
    _edit_config(f, model_type="falcon")
    with pytest.raises(CheckpointError, match="model_type 'falcon'"):
        load_pretrained(f)
    f = _copy("qwen2", tmp_path)
    _edit_tensors(f, lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.1\.self_attn\.k_proj\.bias'"):
        load_pretrained(f)
    f = _copy("gpt2", tmp_path)
    _edit_tensors(f, lambda t: t.update({"transformer.h.0.attn.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'transformer\.h\.0\.attn\.extra\.weight'"):
        load_pretrained(f)
    f = _copy("mistral", tmp_path)
    _edit_config(f, intermediate_size=48)
    with pytest.raises(CheckpointError, match=r"tensor 'model\.layers\.0\.mlp\.(gate|up|down)_proj\.weight' has shape"):
        load_pretrained(f)
    with pytest.raises(ValueError, match="floating"):
        load_pretrained(DATA / "llama", dtype=jnp.int8)
    with pytest.raises(CheckpointError, match="not a directory"):
        load_pretrained(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        load_pretrained(tmp_path / "empty")


def test_save_errors(tmp_path):
    model, params = load_pretrained(DATA / "llama", progress=False)
    save_pretrained(tmp_path / "m", model, params, progress=False)
    with pytest.raises(CheckpointError, match="already exists"):
        save_pretrained(tmp_path / "m", model, params, progress=False)
    save_pretrained(tmp_path / "m", model, params, overwrite=True, progress=False)
    other = Llama(model.config.__class__(**{**model.config.__dict__, "intermediate_size": 48}))
    with pytest.raises(ValueError, match="mlp"):
        save_pretrained(tmp_path / "x", other, params, progress=False)
    assert not (tmp_path / "x").exists()
