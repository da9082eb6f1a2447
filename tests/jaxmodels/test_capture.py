"""Activation capture: statistics equal NumPy references on the explicitly materialized layer inputs."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodels.capture import (capture_inputs, capture_outputs, collect_stats, layer_input_matrix, layer_order,
                               make_accumulate_step)
from jaxmodels.models import MLP


class ConvNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), padding="SAME", name="conv_a")(x))
        x = nn.relu(nn.Conv(6, (3, 3), strides=(2, 2), padding="VALID", name="conv_b")(x))
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(3, name="head")(x)


def _mlp():
    model = MLP(features=(16, 8), num_outputs=5)
    params = model.init(jax.random.key(0), jnp.zeros((1, 12)))["params"]
    return model, params, lambda p, x: model.apply({"params": p}, x)


def _hidden_np(params, x):
    """NumPy forward of the MLP returning each Dense layer's input."""
    ins = []
    h = np.asarray(x, np.float64)
    for i in range(3):
        ins.append(h)
        k = np.asarray(params[f"Dense_{i}"]["kernel"], np.float64)
        b = np.asarray(params[f"Dense_{i}"]["bias"], np.float64)
        h = h @ k + b
        if i < 2:
            h = np.maximum(h, 0)
    return ins


def test_mlp_stats_match_numpy():
    model, params, apply_fn = _mlp()
    rng = np.random.default_rng(0)
    batches = [rng.normal(size=(7, 12)).astype(np.float32) for _ in range(3)]
    st = collect_stats(apply_fn, params, batches, stats=("gram", "sum", "abs_sum", "abs_max"), progress=False)
    assert sorted(st) == ["Dense_0", "Dense_1", "Dense_2"]
    assert layer_order(apply_fn, params, batches[0]) == ["Dense_0", "Dense_1", "Dense_2"]
    xs = [np.concatenate(z) for z in zip(*[_hidden_np(params, b) for b in batches])]
    for i, X in enumerate(xs):
        s = st[f"Dense_{i}"]
        # float32 accumulation of 21 products of O(1) values: relative error ~1e-6; 1e-4 is generous.
        np.testing.assert_allclose(s.gram, X.T @ X, rtol=1e-4, atol=1e-4)
        assert float(s.count) == 21
        np.testing.assert_allclose(s.mean, X.mean(0), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(s.abs_mean, np.abs(X).mean(0), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(s.abs_max, np.abs(X).max(0), rtol=1e-5, atol=1e-6)


def test_include_exclude_and_raw_inputs():
    model, params, apply_fn = _mlp()
    x = np.random.default_rng(1).normal(size=(5, 12)).astype(np.float32)
    st = collect_stats(apply_fn, params, [x], include=r"Dense_[01]", exclude="Dense_0", progress=False)
    assert list(st) == ["Dense_1"] and st["Dense_1"].sum is None
    (inp,) = capture_inputs(apply_fn, params, x, "Dense_1")
    np.testing.assert_allclose(inp, _hidden_np(params, x)[1], rtol=1e-5, atol=1e-5)
    (out,) = capture_outputs(apply_fn, params, x, "Dense_2")
    np.testing.assert_allclose(out, apply_fn(params, x), rtol=1e-6)
    # traceable inside jit
    inp_j = jax.jit(lambda p, b: capture_inputs(apply_fn, p, b, "Dense_1")[0])(params, x)
    np.testing.assert_allclose(inp_j, inp, rtol=1e-6)
    with pytest.raises(ValueError, match="not called"):
        capture_inputs(apply_fn, params, x, "nope")
    with pytest.raises(ValueError, match="unknown statistic"):
        collect_stats(apply_fn, params, [x], stats=("hessian",))
    with pytest.raises(ValueError, match="no Dense"):
        collect_stats(apply_fn, params, [x], include="zzz", progress=False)


def test_conv_patches_reproduce_conv():
    net = ConvNet()
    x = np.random.default_rng(2).normal(size=(2, 7, 7, 3)).astype(np.float32)
    params = net.init(jax.random.key(1), x)["params"]
    apply_fn = lambda p, b: net.apply({"params": p}, b)  # noqa: E731
    for layer in ("conv_a", "conv_b"):
        (inp,) = capture_inputs(apply_fn, params, x, layer)
        (out,) = capture_outputs(apply_fn, params, x, layer)
        mod = nn.Conv(params[layer]["kernel"].shape[-1], (3, 3), padding="SAME" if layer == "conv_a" else "VALID",
                      strides=(1, 1) if layer == "conv_a" else (2, 2))
        X = layer_input_matrix(mod, inp)
        k = params[layer]["kernel"]
        y = X @ k.reshape(-1, k.shape[-1]) + params[layer]["bias"]
        # patches @ kernel is the same sum as the convolution, reordered: float32 rounding only.
        np.testing.assert_allclose(y, out.reshape(-1, out.shape[-1]), rtol=1e-4, atol=1e-5)
    st = collect_stats(apply_fn, params, [x], progress=False)
    assert st["conv_a"].gram.shape == (27, 27) and float(st["conv_a"].count) == 2 * 49
    assert st["conv_b"].gram.shape == (36, 36) and float(st["conv_b"].count) == 2 * 9


def test_sharded_equals_unsharded(mesh):
    model, params, apply_fn = _mlp()
    rng = np.random.default_rng(3)
    rows = 2 * mesh.shape["data"]  # two rows per device, whatever the device count
    batches = [rng.normal(size=(rows, 12)).astype(np.float32) for _ in range(2)]
    ref = collect_stats(apply_fn, params, batches, stats=("gram", "abs_sum", "abs_max"), progress=False)
    sh = collect_stats(apply_fn, params, batches, stats=("gram", "abs_sum", "abs_max"), mesh=mesh, progress=False)
    assert sorted(sh) == sorted(ref) == ["Dense_0", "Dense_1", "Dense_2"]
    for k in ref:
        assert sh[k].gram.sharding.is_fully_replicated and sh[k].abs_max.sharding.is_fully_replicated
        # Sums (gram, abs_sum) are reduced per shard and then all-reduced: another summation order, float32
        # rounding ~1e-6 relative on sums of a few dozen O(1) terms; 1e-5 is ~80 ulps of headroom.
        np.testing.assert_allclose(sh[k].gram, ref[k].gram, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(sh[k].abs_sum, ref[k].abs_sum, rtol=1e-5, atol=1e-5)
        assert float(sh[k].count) == float(ref[k].count) == 2 * rows  # integer-valued float32 sums: exact
    # Dense_0's input is the batch itself: the sharded abs_max is a max (per shard, across devices, across
    # batches) over the very same float32 values, and max is exact in any order, so it must be bit-for-bit.
    np.testing.assert_array_equal(np.asarray(sh["Dense_0"].abs_max), np.abs(np.concatenate(batches)).max(0))
    np.testing.assert_array_equal(np.asarray(sh["Dense_0"].abs_max), np.asarray(ref["Dense_0"].abs_max))
    # Deeper layers see activations relu(h @ k + b) that each device computes with its own matmul over a 2-row
    # shard: XLA may block/vectorise that dot differently from the full-batch one, so an activation (and hence its
    # max) can differ by a few float32 ulps (1 ulp = 2.4e-7 measured). The max itself adds no error: bound the
    # difference by the dot's rounding, |error| <= ~n_in * eps * sum|h||k| ~ 1e-6 here, with 1e-5 relative.
    for k in ("Dense_1", "Dense_2"):
        np.testing.assert_allclose(sh[k].abs_max, ref[k].abs_max, rtol=1e-5, atol=1e-6)


def test_accumulate_step_custom_loop_bf16():
    model = MLP(features=(8,), num_outputs=3, dtype=jnp.bfloat16)
    params = model.init(jax.random.key(0), jnp.zeros((1, 4)))["params"]
    apply_fn = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    init, step = make_accumulate_step(apply_fn, stats=("gram",))
    x = jnp.ones((3, 4), jnp.bfloat16)
    acc = init(params, x)
    acc = step(acc, params, x)
    assert acc["Dense_0"].gram.dtype == jnp.float32
    np.testing.assert_allclose(acc["Dense_0"].gram, 3 * np.ones((4, 4)))
