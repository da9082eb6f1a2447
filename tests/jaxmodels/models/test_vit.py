import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxmodels
from jaxmodels.datasets import load_digits_split
from jaxmodels.models import VIT_CONFIGS, VIT_RULES_DP, VIT_RULES_TP, ViT
from tests.jaxmodels.models.helpers import sharded_forward, train_losses

TINY = dict(patch_size=4, width=32, depth=2, num_heads=4, mlp_dim=64, num_classes=10)


def _init(model, shape=(2, 8, 8, 1)):
    return jax.jit(model.init)(jax.random.key(0), jnp.zeros(shape))["params"]


def test_shapes_and_param_paths():
    model = ViT(**TINY)
    params = _init(model)
    flat = jaxmodels.flatten(params)
    assert flat["patch_embed/kernel"].shape == (4, 4, 1, 32)
    assert flat["cls"].shape == (1, 1, 32)
    assert flat["pos_embed"].shape == (1, 5, 32)  # 4 patches + cls
    for name in ("query", "key", "value", "out"):
        assert flat[f"block_1/attn/{name}/kernel"].shape == (32, 32)
    assert flat["block_0/mlp/fc1/kernel"].shape == (32, 64)
    assert flat["block_0/mlp/fc2/kernel"].shape == (64, 32)
    assert flat["head/kernel"].shape == (32, 10)
    x = jax.random.normal(jax.random.key(1), (3, 8, 8, 1))
    y = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, x)
    assert y.shape == (3, 10) and bool(jnp.all(jnp.isfinite(y)))


def test_mean_pool_rmsnorm_and_deit_tiny_shape():
    model = ViT(**{**TINY, "pool": "mean", "norm": "rmsnorm"})
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((2, 8, 8, 1)))["params"]
    assert "cls" not in params and "scale" in params["norm"] and "bias" not in params["norm"]
    # DeiT-Tiny: 5.7M parameters (Touvron et al., Table 1), checked abstractly without allocating.
    shapes = jax.eval_shape(lambda: ViT(**VIT_CONFIGS["deit_tiny"]).init(jax.random.key(0),
                                                                         jnp.zeros((1, 224, 224, 3))))
    n = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
    assert 5.6e6 < n < 5.8e6, n


def test_tokens_are_permutation_equivariant_without_pos_and_cls():
    """Attention + MLP blocks are permutation-equivariant over tokens: with pos_embed zeroed and mean pooling,
    permuting the patches of the image leaves the logits unchanged."""
    model = ViT(**{**TINY, "patch_size": 2, "pool": "mean"})
    params = _init(model)
    params = {**params, "pos_embed": jnp.zeros_like(params["pos_embed"])}
    x = np.asarray(jax.random.normal(jax.random.key(2), (2, 8, 8, 1)))
    # Permute 2x2 patches: swap patch rows 0 and 3.
    xp = x.copy()
    xp[:, 0:2], xp[:, 6:8] = x[:, 6:8], x[:, 0:2]
    f = lambda x: jax.jit(model.apply)({"params": params}, jnp.asarray(x))
    np.testing.assert_allclose(f(x), f(xp), atol=1e-5)  # float32 reduction-order noise


def test_bad_config_rejected():
    shapes = lambda m: jax.eval_shape(m.init, jax.random.key(0), jnp.zeros((2, 8, 8, 1)))
    with pytest.raises(ValueError, match="divisible by patch_size"):
        shapes(ViT(**{**TINY, "patch_size": 3}))
    with pytest.raises(ValueError, match="norm"):
        shapes(ViT(**{**TINY, "norm": "batchnorm"}))
    with pytest.raises(ValueError, match="num_heads"):
        shapes(ViT(**{**TINY, "num_heads": 5}))


@pytest.mark.parametrize("rules_name", ["dp", "tp"])
def test_sharded_equals_unsharded(rules_name, mesh, mesh_2d):
    rules, m = (VIT_RULES_DP, mesh) if rules_name == "dp" else (VIT_RULES_TP, mesh_2d)
    model = ViT(**TINY)
    params = _init(model)
    x = jax.random.normal(jax.random.key(3), (8, 8, 8, 1))
    apply_fn = lambda p, x: model.apply({"params": p}, x)
    ref = jax.jit(apply_fn)(params, x)
    out, p = sharded_forward(apply_fn, params, x, rules, m)
    if rules_name == "tp" and m.shape["model"] > 1:
        assert p["block_0"]["attn"]["query"]["kernel"].sharding.spec == jax.sharding.PartitionSpec(None, "model")
        assert p["block_0"]["mlp"]["fc2"]["kernel"].sharding.spec == jax.sharding.PartitionSpec("model", None)
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)  # only the all-reduce order differs


def test_trains_on_digits():
    data = load_digits_split(images=True)
    model = ViT(**VIT_CONFIGS["digits"])
    params = _init(model)
    losses, state = train_losses(lambda p, x: model.apply({"params": p}, x), params, data.x_train, data.y_train,
                                 steps=60)
    # Chance level is ln(10) = 2.30; 60 Adam steps on digits bring the loss well below it.
    assert losses[:5].mean() > 1.8 and losses[-10:].mean() < 1.0, losses
