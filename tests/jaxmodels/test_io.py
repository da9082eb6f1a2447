import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from safetensors import safe_open

from jaxmodels import io, sharding, tree


def sample_tree():
    k = jax.random.split(jax.random.key(0), 3)
    return {"encoder": {"Dense_0": {"kernel": jax.random.normal(k[0], (16, 8)), "bias": jnp.zeros(8)},
                        "emb": jax.random.normal(k[1], (32, 16)).astype(jnp.bfloat16)},
            "head": jax.random.normal(k[2], (8, 3), jnp.float16),
            "step": jnp.array(7, jnp.int32)}


def assert_trees_equal(a, b):
    tree.check_compatible(a, b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_safetensors_roundtrip_with_bf16(tmp_path):
    t = sample_tree()
    path = io.save_safetensors(tmp_path / "m.safetensors", t, metadata={"format": "flax"})
    assert io.safetensors_metadata(path) == {"format": "flax"}
    flat = io.load_safetensors(path)
    assert flat["encoder/emb"].dtype == jnp.bfloat16
    assert_trees_equal(io.load_safetensors(path, like=t), t)
    assert_trees_equal(io.load_safetensors(path, nested=True), t)
    # The file is a standard safetensors file: the reference reader sees the same tensors.
    with safe_open(str(path), framework="flax") as f:
        assert set(f.keys()) == set(tree.flatten(t))
        np.testing.assert_array_equal(f.get_tensor("encoder/emb"), t["encoder"]["emb"])
    specs = io.safetensors_specs(path)
    assert specs["head"].shape == (8, 3) and specs["head"].dtype == np.float16
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temp file left


def test_iter_one_tensor_at_a_time_numpy_bf16(tmp_path):
    t = sample_tree()
    path = io.save_safetensors(tmp_path / "m.safetensors", t)
    it = io.iter_safetensors(path, names=["head", "encoder/emb"])
    name, arr = next(it)
    assert name == "head" and isinstance(arr, np.ndarray) and arr.dtype == np.float16
    name, arr = next(it)
    assert arr.dtype == ml_dtypes.bfloat16
    with pytest.raises(io.CheckpointError, match="no tensor named 'nope'"):
        list(io.iter_safetensors(path, names=["nope"]))


def test_sharded_index_folder(tmp_path):
    t = tree.flatten(sample_tree())
    names = list(t)
    io.save_safetensors(tmp_path / "model-00001-of-00002.safetensors", {n: t[n] for n in names[:2]})
    io.save_safetensors(tmp_path / "model-00002-of-00002.safetensors", {n: t[n] for n in names[2:]})
    wm = {n: f"model-0000{1 if i < 2 else 2}-of-00002.safetensors" for i, n in enumerate(names)}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    loaded = io.load_safetensors(tmp_path)
    assert set(loaded) == set(names)
    for n in names:
        np.testing.assert_array_equal(loaded[n], t[n])
    assert set(io.safetensors_specs(tmp_path)) == set(names)


def test_truncated_and_corrupt_files_raise_naming_file(tmp_path):
    path = io.save_safetensors(tmp_path / "m.safetensors", sample_tree())
    data = path.read_bytes()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(data[:-10])
    with pytest.raises(io.CheckpointError, match="trunc.safetensors"):
        io.load_safetensors(trunc)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(io.CheckpointError, match="garbage.safetensors"):
        io.safetensors_specs(garbage)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    with pytest.raises(io.CheckpointError, match="empty.safetensors"):
        io.load_safetensors(empty)
    with pytest.raises(io.CheckpointError, match="no such file"):
        io.load_safetensors(tmp_path / "missing.safetensors")


def test_template_mismatch_is_clear(tmp_path):
    t = sample_tree()
    path = io.save_safetensors(tmp_path / "m.safetensors", t)
    bad = dict(t, head=jnp.zeros((8, 4), jnp.float16))
    with pytest.raises(io.CheckpointError, match=r"'head'.*\(8, 3\).*\(8, 4\)"):
        io.load_safetensors(path, like=bad)


def test_writer_is_atomic_and_streaming(tmp_path):
    out = tmp_path / "stream.safetensors"
    specs = {"a": jax.ShapeDtypeStruct((4, 4), jnp.float32), "b": jax.ShapeDtypeStruct((3,), jnp.bfloat16)}
    w = io.SafetensorsWriter(out, specs)
    w.write("b", jnp.ones(3, jnp.bfloat16))
    assert not out.exists()  # nothing visible before close
    with pytest.raises(io.CheckpointError, match="'a' was never written"):
        w.close()
    assert not out.exists() and not list(tmp_path.iterdir())
    # A crash mid-write (exception inside the block) leaves nothing behind, and an existing file is untouched.
    io.save_safetensors(out, {"old": jnp.zeros(2)})
    with pytest.raises(RuntimeError):
        with io.SafetensorsWriter(out, specs) as w:
            w.write("a", jnp.ones((4, 4)))
            raise RuntimeError("crash")
    assert list(io.load_safetensors(out)) == ["old"]
    assert [p.name for p in tmp_path.iterdir()] == ["stream.safetensors"]
    with pytest.raises(io.CheckpointError, match="declared shape"):
        with io.SafetensorsWriter(out, specs) as w:
            w.write("a", jnp.ones((4, 5)))
    # Written out of order, read back in full.
    with io.SafetensorsWriter(out, specs) as w:
        w.write("b", jnp.arange(3).astype(jnp.bfloat16))
        w.write("a", jnp.eye(4))
    got = io.load_safetensors(out)
    np.testing.assert_array_equal(got["a"], np.eye(4))
    np.testing.assert_array_equal(got["b"].astype(np.float32), [0, 1, 2])


def test_orbax_roundtrip_bf16_and_restore_into_sharding(tmp_path, mesh_2d):
    t = sample_tree()
    path = io.save_checkpoint(tmp_path / "ckpt", t)
    assert_trees_equal(io.restore_checkpoint(path), t)
    rules = [(r"Dense_0/kernel$", P(None, "model")), (r"emb$", P("data", None))]
    sh = sharding.rules_to_shardings(t, rules, mesh_2d)
    restored = io.restore_checkpoint(path, target=t, shardings=sh)
    assert_trees_equal(restored, t)
    assert restored["encoder"]["Dense_0"]["kernel"].sharding.spec == P(None, "model")
    assert restored["encoder"]["emb"].sharding.spec == P("data", None)
    assert restored["encoder"]["emb"].dtype == jnp.bfloat16
    # Target from metadata alone (no template), straight into shardings.
    abstract = io.restore_checkpoint(path, shardings=sh)
    assert_trees_equal(abstract, t)


def test_orbax_errors_and_overwrite(tmp_path):
    t = sample_tree()
    path = io.save_checkpoint(tmp_path / "ckpt", t)
    with pytest.raises(io.CheckpointError, match="already exists"):
        io.save_checkpoint(path, t)
    t2 = jax.tree.map(lambda x: x + 1, t)
    io.save_checkpoint(path, t2, overwrite=True)
    assert_trees_equal(io.restore_checkpoint(path), t2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    with pytest.raises(io.CheckpointError, match="no such checkpoint"):
        io.restore_checkpoint(tmp_path / "nothing")
    bad = dict(t, head=jnp.zeros((2, 2), jnp.float16))
    with pytest.raises(io.CheckpointError, match="ckpt"):
        io.restore_checkpoint(path, target=bad)


def test_overwrite_refused_with_several_processes(tmp_path, monkeypatch):
    """Every host of a multi-process job writes into the one directory orbax coordinates, so there is no private
    staging dir to swap in: overwrite is refused with a clear error instead of racing renames across hosts."""
    path = io.save_checkpoint(tmp_path / "ckpt", {"w": jnp.ones(3)})
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(io.CheckpointError, match="single process"):
        io.save_checkpoint(path, {"w": jnp.zeros(3)}, overwrite=True)
    monkeypatch.undo()
    np.testing.assert_array_equal(np.asarray(io.restore_checkpoint(path)["w"]), np.ones(3))
