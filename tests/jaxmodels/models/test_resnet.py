import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxmodels
from jaxmodels.datasets import load_digits_split
from jaxmodels.models import RESNET_RULES_DP, RESNET_RULES_TP, ResNet, ResNet20, layers_to_blocks
from jaxmodels.train import init_train_state, make_train_step
from tests.jaxmodels.models.helpers import sharded_forward


def _init(model, shape=(2, 8, 8, 1)):
    return jax.jit(model.init)(jax.random.key(0), jnp.zeros(shape))


def test_resnet20_size_and_paths():
    v = jax.eval_shape(lambda: ResNet20().init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
    n = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(v["params"]))
    # He et al. (2016), Table 6: ResNet-20 has 0.27M parameters.
    assert 0.26e6 < n < 0.28e6, n
    flat = jaxmodels.flatten(v["params"])
    assert flat["block_3/conv1/kernel"].shape == (3, 3, 16, 32)
    assert flat["block_6/conv1/kernel"].shape == (3, 3, 32, 64)
    assert flat["head/kernel"].shape == (64, 10)
    assert "block_3/shortcut_conv/kernel" not in flat  # option A is parameter-free
    assert set(jaxmodels.flatten(v["batch_stats"])) == {p.replace("scale", "mean") for p in flat if
                                                        p.endswith("scale")} | {p.replace("scale", "var") for p in
                                                                                flat if p.endswith("scale")}
    vb = jax.eval_shape(lambda: ResNet20(shortcut="B").init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
    assert vb["params"]["block_6"]["shortcut_conv"]["kernel"].shape == (1, 1, 32, 64)


@pytest.mark.parametrize("downsample_at,width,spatial", [((3, 6), 64, 2), ((), 16, 8), ((0, 1, 2), 128, 1),
                                                        ((8,), 32, 4)])
def test_downsampling_positions_set_shapes(downsample_at, width, spatial):
    model = ResNet20(downsample_at=downsample_at)
    x = jnp.zeros((2, 8, 8, 1))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
    assert variables["params"]["head"]["kernel"].shape == (width, 10)
    # Capture the last block's output shape.
    _, inter = jax.eval_shape(lambda v: model.apply(v, x, capture_intermediates=lambda m, _: m.name == "block_8",
                                                    mutable=["intermediates"]), variables)
    assert inter["intermediates"]["block_8"]["__call__"][0].shape == (2, spatial, spatial, width)


def test_layer_indices():
    assert layers_to_blocks((7, 13)) == (3, 6)  # the standard ResNet-20 downsampling conv layers
    with pytest.raises(ValueError, match="first conv"):
        layers_to_blocks((8,))
    shapes = lambda m: jax.eval_shape(m.init, jax.random.key(0), jnp.zeros((2, 8, 8, 1)))
    with pytest.raises(ValueError, match="downsample_at"):
        shapes(ResNet20(downsample_at=(9,)))
    with pytest.raises(ValueError, match="shortcut"):
        shapes(ResNet20(shortcut="C"))


def test_batchnorm_train_updates_stats_eval_uses_them():
    model = ResNet(num_blocks=2, downsample_at=(1,), width=4)
    v = _init(model)
    x = jax.random.normal(jax.random.key(1), (16, 8, 8, 1)) * 3 + 1
    y, upd = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))(v, x)
    # momentum 0.9: new mean = 0.9 * 0 + 0.1 * batch mean of the stem conv output.
    conv = jax.jit(functools.partial(model.apply, capture_intermediates=lambda m, _: m.name == "stem_conv",
                                     mutable=["intermediates"]))(v, x)[1]["intermediates"]["stem_conv"]["__call__"][0]
    np.testing.assert_allclose(upd["batch_stats"]["stem_bn"]["mean"], 0.1 * conv.mean((0, 1, 2)), rtol=1e-4,
                               atol=1e-6)
    # Eval mode is per example (no batch dependence): reversing the batch reverses the logits.
    f = jax.jit(model.apply)
    np.testing.assert_allclose(f({**v, **upd}, x)[::-1], f({**v, **upd}, x[::-1]), atol=1e-5)


@pytest.mark.parametrize("rules_name", ["dp", "tp"])
def test_sharded_equals_unsharded(rules_name, mesh, mesh_2d):
    rules, m = (RESNET_RULES_DP, mesh) if rules_name == "dp" else (RESNET_RULES_TP, mesh_2d)
    model = ResNet(num_blocks=2, downsample_at=(1,), width=4)
    v = _init(model)
    x = jax.random.normal(jax.random.key(2), (8, 8, 8, 1))

    def f(v, x):  # training-mode forward: BatchNorm statistics over the whole (sharded) batch
        return model.apply(v, x, train=True, mutable=["batch_stats"])

    ref = jax.jit(f)(v, x)
    out, _ = sharded_forward(f, v, x, rules, m)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=2e-5)  # reduction-order noise only


def test_trains_on_digits():
    data = load_digits_split(images=True)
    model = ResNet(num_blocks=3, downsample_at=(1, 2), width=8)
    v = _init(model)

    def apply_fn(p, s, x):
        logits, upd = model.apply({"params": p, "batch_stats": s}, x, train=True, mutable=["batch_stats"])
        return logits, upd["batch_stats"]

    tx = optax.adam(1e-2)
    state = init_train_state(v["params"], tx, model_state=v["batch_stats"])
    step = make_train_step(apply_fn, tx, has_model_state=True)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(40):
        idx = rng.integers(0, len(data.x_train), 32)
        state, metrics = step(state, data.x_train[idx], data.y_train[idx])
        losses.append(float(metrics["loss"]))
    assert np.mean(losses[:3]) > 1.8 and np.mean(losses[-10:]) < 0.8, losses
    acc = float(jnp.mean(jnp.argmax(jax.jit(model.apply)({"params": state.params, "batch_stats": state.model_state},
                                                        data.x_test), -1) == data.y_test))
    assert acc > 0.7, acc  # eval mode with the running statistics the step carried
