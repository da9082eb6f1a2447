"""BANG (Lin et al. 2024): label smoothing and MixUp against NumPy transcriptions, the calibration gap, bad input,
jit + 8-device sharding, and the paper's claim on digits: the WiSE-FT path of a confidence-reduced fine-tune keeps
more out-of-distribution accuracy than the plain fine-tune's, and the fine-tuned model is less overconfident."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from merging.bang import (MixupBatch, fine_tune, label_smoothed_cross_entropy, make_bang_loss, mixup_batch,
                          mixup_cross_entropy, overconfidence, smooth_targets, wise_ft_curve)


def _np_log_softmax(z):
    z = np.asarray(z, np.float64)
    m = z.max(-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def _np_ls_xent(z, y, eps):
    k = z.shape[-1]
    q = np.full(z.shape, eps / k)
    q[np.arange(len(y)), y] += 1.0 - eps
    return -(q * _np_log_softmax(z)).sum(-1)


def test_label_smoothing_mixup_and_gap_match_numpy():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(12, 5)).astype(np.float32) * 3
    y = rng.integers(0, 5, 12).astype(np.int32)
    z_before = z.copy()
    for eps in (0.0, 0.1, 0.3):
        np.testing.assert_allclose(label_smoothed_cross_entropy(z, y, smoothing=eps), _np_ls_xent(z, y, eps),
                                   rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(label_smoothed_cross_entropy(z, y, smoothing=0.0),
                               optax.softmax_cross_entropy_with_integer_labels(z, y), rtol=1e-6, atol=1e-6)
    q = np.asarray(smooth_targets(y, 5, 0.2))
    np.testing.assert_allclose(q.sum(-1), 1.0, rtol=1e-6)
    assert np.allclose(q[np.arange(12), y], 0.8 + 0.04) and np.isclose(q.min(), 0.04)
    # MixUp: x~ = λ x + (1-λ) x[perm], both label sets, perm a permutation, λ in [0, 1]
    x = rng.uniform(size=(12, 7)).astype(np.float32)
    mb = mixup_batch(jax.random.key(3), x, y, alpha=0.4)
    lam, perm = float(mb.lam), np.asarray(mb.perm)
    assert 0.0 <= lam <= 1.0 and sorted(perm.tolist()) == list(range(12))
    np.testing.assert_allclose(mb.x, lam * x + (1 - lam) * x[perm], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(mb.y_a, y)
    np.testing.assert_array_equal(mb.y_b, y[perm])
    for eps in (0.0, 0.1):
        ref = lam * _np_ls_xent(z, y, eps) + (1 - lam) * _np_ls_xent(z, y[perm], eps)
        np.testing.assert_allclose(mixup_cross_entropy(z, mb, smoothing=eps), ref, rtol=1e-5, atol=1e-6)
    none = mixup_batch(jax.random.key(3), x, y, alpha=0.0)  # alpha 0: no mixing
    assert float(none.lam) == 1.0
    np.testing.assert_array_equal(none.x, x)
    # the BANG objective = the mean MixUp + label-smoothing loss of the same draw; (0, 0) = plain cross-entropy
    apply_fn = lambda p, xb: xb @ p["w"]  # noqa: E731
    params = {"w": rng.normal(size=(7, 5)).astype(np.float32)}
    key = jax.random.key(5)
    mb5 = mixup_batch(key, x, y, alpha=0.3)  # the loss draws its MixUp from its key the same way
    got = make_bang_loss(mixup_alpha=0.3, smoothing=0.1)(params, apply_fn, x, y, key)
    z5, lam5 = np.asarray(mb5.x) @ params["w"], float(mb5.lam)
    ref = lam5 * _np_ls_xent(z5, y, 0.1) + (1 - lam5) * _np_ls_xent(z5, y[np.asarray(mb5.perm)], 0.1)
    np.testing.assert_allclose(got, ref.mean(), rtol=1e-5)
    np.testing.assert_allclose(make_bang_loss(mixup_alpha=0, smoothing=0)(params, apply_fn, x, y, key),
                               _np_ls_xent(x @ params["w"], y, 0.0).mean(), rtol=1e-5)
    # calibration gap: mean max softmax - accuracy
    p = np.exp(_np_log_softmax(z))
    np.testing.assert_allclose(overconfidence(z, y), p.max(-1).mean() - np.mean(z.argmax(-1) == y), atol=1e-6)
    np.testing.assert_array_equal(z, z_before)  # inputs not modified


def test_bad_input_is_rejected():
    z, y = np.zeros((4, 3), np.float32), np.array([0, 1, 2, 0], np.int32)
    with pytest.raises(ValueError, match="smoothing"):
        label_smoothed_cross_entropy(z, y, smoothing=1.0)
    with pytest.raises(ValueError, match="disagree"):
        label_smoothed_cross_entropy(z, y[:3])
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        label_smoothed_cross_entropy(z, np.array([0, 1, 3, 0], np.int32))
    with pytest.raises(ValueError, match="NaN"):
        label_smoothed_cross_entropy(np.full((4, 3), np.nan, np.float32), y)
    with pytest.raises(ValueError, match="mixup_alpha"):
        mixup_batch(jax.random.key(0), z, y, alpha=-1.0)
    with pytest.raises(ValueError, match="NaN"):
        mixup_batch(jax.random.key(0), np.full((4, 3), np.inf, np.float32), y)
    with pytest.raises(TypeError, match="MixupBatch"):
        mixup_cross_entropy(z, (z, y, y, 1.0))
    with pytest.raises(ValueError, match="mixup_alpha"):
        make_bang_loss(mixup_alpha=float("nan"))
    apply_fn = lambda p, x: x @ p["w"]  # noqa: E731
    params = {"w": np.zeros((3, 3), np.float32)}
    kw = dict(tx=optax.sgd(0.1), steps=2, batch_size=2, key=jax.random.key(0))
    with pytest.raises(ValueError, match="steps"):
        fine_tune(apply_fn, params, z, y, **{**kw, "steps": 0})
    with pytest.raises(ValueError, match="disagree"):
        fine_tune(apply_fn, params, z, y[:2], **kw)
    with pytest.raises(ValueError, match="non-finite"):
        fine_tune(apply_fn, {"w": np.full((3, 3), np.nan, np.float32)}, z, y, **kw)
    with pytest.raises(ValueError, match="alphas"):
        wise_ft_curve(params, params, [0.5, 1.5], lambda p: 0.0)
    assert isinstance(mixup_batch(jax.random.key(0), z, y), MixupBatch)


def test_jit_and_sharded_equal_single_device(mesh):
    rng = np.random.default_rng(1)
    x = rng.uniform(size=(64, 6)).astype(np.float32)
    y = rng.integers(0, 4, 64).astype(np.int32)
    z = rng.normal(size=(64, 4)).astype(np.float32)
    row = NamedSharding(mesh, P("data"))
    ls = jax.jit(lambda a, b: label_smoothed_cross_entropy(a, b, smoothing=0.1))
    np.testing.assert_allclose(ls(jax.device_put(z, row), jax.device_put(y, row)), ls(z, y), rtol=1e-6, atol=1e-6)
    apply_fn = lambda p, xb: jnp.tanh(xb @ p["w1"]) @ p["w2"]  # noqa: E731
    params = {"w1": rng.normal(size=(6, 8)).astype(np.float32) * 0.5, "w2": rng.normal(size=(8, 4)).astype(np.float32)}
    kw = dict(tx=optax.adam(1e-2), steps=6, batch_size=16, key=jax.random.key(2), loss_fn=make_bang_loss())
    ref = fine_tune(apply_fn, params, x, y, **kw)
    got = fine_tune(apply_fn, params, jax.device_put(x, row), jax.device_put(y, row), **kw)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got.params, ref.params)
    np.testing.assert_allclose(got.losses, ref.losses, rtol=1e-5, atol=1e-6)
    assert ref.losses.shape == (6,) and not np.allclose(ref.params["w1"], params["w1"])


@pytest.fixture(scope="module")
def digits_shift():
    """The pre-trained model θ_0 (an MLP trained on clean digits and inverted digits, half each: it handles both
    domains), the in-distribution data (clean digits) and the OOD test set (inverted test digits)."""
    from jaxmodels.datasets import load_digits_split
    from jaxmodels.models import MLP
    from merging.federated.partitions import domain_transform

    d = load_digits_split(seed=0)
    model = MLP(features=(32,), num_outputs=10)
    apply_fn = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    half = len(d.x_train) // 2
    x_pre = np.concatenate([d.x_train[:half], domain_transform(d.x_train[half:], "invert")])
    init = model.init(jax.random.key(0), d.x_train[:1])["params"]
    plain = make_bang_loss(mixup_alpha=0.0, smoothing=0.0)
    tx = optax.adam(1e-2)  # the fine-tunes' optimizer and schedule: the plain one reuses this compiled program
    theta0 = fine_tune(apply_fn, init, x_pre, d.y_train, tx=tx, steps=300, batch_size=64, key=jax.random.key(1),
                       loss_fn=plain).params
    return d, apply_fn, theta0, jnp.asarray(domain_transform(d.x_test, "invert")), tx


def test_claim_bang_keeps_ood_accuracy_along_the_wise_ft_path(digits_shift):
    """Fine-tune θ_0 on clean digits, plainly and with BANG's MixUp(0.2) + label smoothing (0.1), then walk both
    WiSE-FT paths. Measured (seeds 0 / 1 / 2; the test runs seed 0): the mean OOD accuracy at α = 0.1 .. 0.9, plain
    0.591 / 0.482 / 0.668 vs BANG 0.781 / 0.558 / 0.696; BANG's path is above the plain one at every α >= 0.6
    (α = 1: 0.577 vs 0.120 / 0.216 vs 0.156 / 0.354 vs 0.154); the fine-tuned model's OOD overconfidence (mean
    max-softmax - accuracy) 0.68 vs 0.17 / 0.73 vs 0.54 / 0.63 vs 0.50; the ID accuracy at α = 1 stays within 0.01
    (0.971 vs 0.967 / 0.967 vs 0.962 / 0.967 vs 0.973)."""
    d, apply_fn, theta0, x_ood, tx = digits_shift
    y = jnp.asarray(d.y_test)
    acc = jax.jit(lambda p, x: jnp.mean(jnp.argmax(apply_fn(p, x), -1) == y))
    eval_fn = lambda p: {"id": acc(p, jnp.asarray(d.x_test)), "ood": acc(p, x_ood)}  # noqa: E731
    alphas = np.linspace(0, 1, 11)
    out = {}
    for name, loss in (("plain", make_bang_loss(mixup_alpha=0.0, smoothing=0.0)), ("bang", make_bang_loss())):
        ft = fine_tune(apply_fn, theta0, d.x_train, d.y_train, tx=tx, steps=300, batch_size=64,
                       key=jax.random.key(2), loss_fn=loss).params
        out[name] = (wise_ft_curve(theta0, ft, alphas, eval_fn), float(overconfidence(apply_fn(ft, x_ood), y)))
    (plain, oc_plain), (bang, oc_bang) = out["plain"], out["bang"]
    inner = slice(1, -1)
    assert bang.metrics["ood"][inner].mean() > plain.metrics["ood"][inner].mean() + 0.02, (bang, plain)
    assert np.all(bang.metrics["ood"][6:] > plain.metrics["ood"][6:]), (bang.metrics["ood"], plain.metrics["ood"])
    assert oc_bang < oc_plain - 0.1, (oc_bang, oc_plain)
    assert bang.metrics["id"][-1] > plain.metrics["id"][-1] - 0.03 and bang.metrics["id"][-1] > 0.93
    np.testing.assert_allclose(bang.metrics["ood"][0], plain.metrics["ood"][0])  # α = 0: both are θ_0
