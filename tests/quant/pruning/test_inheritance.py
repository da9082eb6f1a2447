"""quant.pruning.inheritance: a NumPy transcription of TinyCLIP's manual weight inheritance (interval_front layers,
front slices of heads / channels) and of its soft-target affinity loss, keep-all == identity on ViT and BERT, the
sliced student runs, sharded == single device, bad input rejected, and the claim on digits: a ViT student inherited
(by weight importance) from a trained teacher distills better than a random one at equal steps, and affinity
mimicking beats training without distillation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxmodels.datasets import load_digits_split
from jaxmodels.models import BertConfig, BertEncoder, ViT
from jaxmodels.tree import flatten
from quant.pruning.inheritance import (
    InheritancePlan, affinity_logits, affinity_loss, affinity_mimicking_loss, head_importance, inherit,
    plan_inheritance, select_layers, select_top,
)

X = jnp.asarray(load_digits_split(images=True).x_train[:8])


_CACHE = {}


def _vit(depth=4):
    """A random ViT teacher (width 32, 4 heads, MLP 64), initialized once (jitted init: one compile)."""
    model = ViT(patch_size=4, width=32, depth=depth, num_heads=4, mlp_dim=64, num_classes=10)
    if depth not in _CACHE:
        _CACHE[depth] = jax.jit(model.init)(jax.random.key(0), X)["params"]
    return model, _CACHE[depth]


def _shapes(model, *args):
    return jax.eval_shape(model.init, jax.random.key(1), *args)["params"]


def _np_tinyclip(teacher, S, ds, hs, ms, dh):
    """TinyCLIP weight_inherit on torch layouts ([out, in]): interval_front layers; q/k/v (3 stacked in torch's
    in_proj, here separate) viewed as (H, dh, d)[:hs, :, :ds]; every other tensor prune_param's front slice."""
    T = len({p.split("/")[0] for p in teacher if p.startswith("block_")})
    step = T // S
    idx = list(range(0, S * step, step))
    out = {}
    for p, v in teacher.items():
        v = np.asarray(v)
        if p.startswith("block_"):
            b, rest = p.split("/", 1)
            if int(b[6:]) not in idx:
                continue
            p = f"block_{idx.index(int(b[6:]))}/{rest}"
            if rest.startswith("attn/") and rest.split("/")[1] in ("query", "key", "value"):
                if rest.endswith("kernel"):
                    w = v.T.reshape(-1, dh, v.shape[0])[:hs, :, :ds]  # torch weight [H·dh, d]
                    out[p] = w.reshape(hs * dh, ds).T
                else:
                    out[p] = v.reshape(-1, dh)[:hs].reshape(-1)
                continue
        shape = {"patch_embed/kernel": v.shape[:-1] + (ds,), "head/kernel": (ds,) + v.shape[1:]}.get(p)
        if shape is None:
            shape = tuple(ds if n == teacher["block_0/attn/query/kernel"].shape[0] else
                          (ms if n == teacher["block_0/mlp/fc1/kernel"].shape[1] else n) for n in v.shape)
            if p.startswith("head/bias"):
                shape = v.shape
        out[p] = v[tuple(slice(0, n) for n in shape)]
    return out


def test_first_slices_match_tinyclip_numpy_reference_and_student_runs():
    model, params = _vit()
    plan = plan_inheritance(params, "vit", teacher_heads=4, depth=2, num_heads=2, mlp_dim=24, method="first")
    assert plan.layers == (0, 2) and plan.sizes == dict(depth=2, num_heads=2, width=16, mlp_dim=24)
    student_model = ViT(patch_size=4, width=16, depth=2, num_heads=2, mlp_dim=24, num_classes=10)
    student = inherit(params, plan, "vit", like=_shapes(student_model, X))
    ref = _np_tinyclip(flatten(params), 2, 16, 2, 24, 8)
    got = flatten(student)
    assert set(got) == set(ref)
    for p in ref:
        np.testing.assert_array_equal(np.asarray(got[p]), ref[p], err_msg=p)
    assert jax.eval_shape(student_model.apply, {"params": student}, X).shape == (8, 10)  # the student runs
    assert select_layers(12, 3) == (0, 4, 8) and select_layers(6, 4) == (0, 1, 2, 3)


def test_importance_selection_matches_numpy_norms():
    _, params = _vit()
    f = {k: np.asarray(v) for k, v in flatten(params).items()}
    a = "block_1/attn/"
    sq = sum((f[a + q + "/kernel"] ** 2).sum(0) for q in ("query", "key", "value")) + (f[a + "out/kernel"] ** 2).sum(1)
    np.testing.assert_allclose(head_importance(params, "vit", 1, 4), np.sqrt(sq.reshape(4, 8).sum(1)), rtol=1e-5)
    plan = plan_inheritance(params, "vit", teacher_heads=4, depth=4, num_heads=3, mlp_dim=16, layers="first")
    assert plan.heads[1] == tuple(sorted(np.argsort(-np.sqrt(sq.reshape(4, 8).sum(1)), kind="stable")[:3]))
    m = "block_0/mlp/"
    ns = (f[m + "fc1/kernel"] ** 2).sum(0) + f[m + "fc1/bias"] ** 2 + (f[m + "fc2/kernel"] ** 2).sum(1)
    assert plan.neurons[0] == tuple(sorted(np.argsort(-ns, kind="stable")[:16]))
    assert select_top(np.array([0.1, 3.0, 3.0, 2.0]), 2) == (1, 2)  # ties: the lower index


def test_keep_all_is_identity_vit_and_bert():
    model, params = _vit()
    plan = plan_inheritance(params, "vit", teacher_heads=4, depth=4, num_heads=4, mlp_dim=64)
    same = inherit(params, plan, "vit", like=params)  # same params, so the same outputs
    jax.tree_util.tree_map(np.testing.assert_array_equal, same, params)
    cfg = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32,
                     max_position_embeddings=16)
    ids = jnp.arange(24).reshape(2, 12) % 40
    bp = jax.jit(BertEncoder(cfg).init)(jax.random.key(0), ids)["params"]
    bplan = plan_inheritance(bp, "bert", teacher_heads=4, depth=2, num_heads=4, mlp_dim=32)
    jax.tree_util.tree_map(np.testing.assert_array_equal, inherit(bp, bplan, "bert", like=bp), bp)
    small_cfg = BertConfig(vocab_size=40, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=16, max_position_embeddings=16)
    splan = plan_inheritance(bp, "bert", teacher_heads=4, depth=1, num_heads=2, mlp_dim=16)
    small = inherit(bp, splan, "bert", like=_shapes(BertEncoder(small_cfg), ids))
    assert jax.eval_shape(BertEncoder(small_cfg).apply, {"params": small}, ids).shape == (2, 12, 8)


def test_sharded_inherit_and_loss_match_single_device(mesh):
    _, params = _vit()
    spec = lambda p, x: P(None, "data") if x.ndim == 2 and x.shape[1] % 8 == 0 else P()
    sh = jax.tree_util.tree_map_with_path(lambda p, x: NamedSharding(mesh, spec(p, x)), params)
    plan = plan_inheritance(params, "vit", teacher_heads=4, depth=1, num_heads=2, mlp_dim=16)
    f = jax.jit(inherit, static_argnums=(1, 2))
    for a, b in zip(jax.tree_util.tree_leaves(f(jax.device_put(params, sh), plan, "vit")),
                    jax.tree_util.tree_leaves(inherit(params, plan, "vit"))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    rng = np.random.default_rng(0)
    sa, sb, ta, tb = (jnp.asarray(rng.standard_normal((16, d)), jnp.float32) for d in (8, 8, 12, 12))
    loss = jax.jit(lambda *v: affinity_loss(*v, student_scale=5.0, teacher_scale=5.0))
    rows = NamedSharding(mesh, P("data", None))
    np.testing.assert_allclose(loss(*(jax.device_put(v, rows) for v in (sa, sb, ta, tb))), loss(sa, sb, ta, tb),
                               rtol=1e-5)


def test_affinity_loss_matches_numpy_reference():
    """TinyCLIP clip_soft_loss: ½[CE(logits_img, softmax(teacher_img)) + CE(logits_txt, softmax(teacher_txt))]."""
    rng = np.random.default_rng(1)
    sa, sb = rng.standard_normal((6, 5)), rng.standard_normal((7, 5))
    ta, tb = rng.standard_normal((6, 9)), rng.standard_normal((7, 9))

    def np_ref(sa, sb, ta, tb, s_scale, t_scale):
        nrm = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
        li, lt = s_scale * nrm(sa) @ nrm(sb).T, t_scale * nrm(ta) @ nrm(tb).T
        ce = lambda x, t: -(np.exp(t - t.max(1, keepdims=True)) / np.exp(t - t.max(1, keepdims=True)).sum(
            1, keepdims=True) * (x - x.max(1, keepdims=True) - np.log(np.exp(x - x.max(1, keepdims=True)).sum(
                1, keepdims=True)))).sum(1).mean()
        return 0.5 * (ce(li, lt) + ce(li.T, lt.T))

    args = [jnp.asarray(v, jnp.float32) for v in (sa, sb, ta, tb)]
    loss = jax.jit(lambda *a, kl: affinity_loss(*a, student_scale=3.0, teacher_scale=10.0, kl=kl), static_argnames="kl")
    got = loss(*args, kl=False)
    np.testing.assert_allclose(float(got), np_ref(sa, sb, ta, tb, 3.0, 10.0), rtol=1e-5)
    # KL form: zero iff the affinities match, ≥ 0, same gradient as the cross entropy
    A = affinity_logits(args[0], args[1], 4.0)
    assert abs(float(jax.jit(affinity_mimicking_loss)(A, A))) < 1e-6
    assert float(loss(*args, kl=True)) > 0
    grad = jax.jit(jax.grad(lambda a, kl: affinity_mimicking_loss(affinity_logits(a, args[1]), A, kl)),
                   static_argnums=1)
    g_kl, g_ce = grad(args[0], True), grad(args[0], False)
    np.testing.assert_allclose(g_kl, g_ce, rtol=1e-5, atol=1e-7)


def test_validation_errors():
    _, params = _vit()
    with pytest.raises(ValueError, match="num_heads"):
        plan_inheritance(params, "vit", teacher_heads=4, depth=1, num_heads=5, mlp_dim=8)
    with pytest.raises(ValueError, match="divisible"):
        plan_inheritance(params, "vit", teacher_heads=5, depth=1, num_heads=2, mlp_dim=8)
    with pytest.raises(ValueError, match="arch"):
        plan_inheritance(params, "resnet", teacher_heads=4, depth=1, num_heads=2, mlp_dim=8)
    with pytest.raises(ValueError, match="importance"):
        plan_inheritance(params, "vit", teacher_heads=4, depth=1, num_heads=2, mlp_dim=8, importance={"x": 1})
    with pytest.raises(ValueError, match="increasing"):
        select_layers(4, 2, (2, 1))
    bad = InheritancePlan((0,), ((0, 1),), (tuple(range(8)),), tuple(range(8)), 8)
    with pytest.raises(ValueError, match="heads·head_dim"):
        inherit(params, bad, "vit")
    nan = jax.tree_util.tree_map(lambda x: x, params)
    nan["head"]["bias"] = nan["head"]["bias"].at[0].set(jnp.nan)
    good = plan_inheritance(params, "vit", teacher_heads=4, depth=1, num_heads=2, mlp_dim=8)
    with pytest.raises(ValueError, match="NaN"):
        inherit(nan, good, "vit")
    with pytest.raises(ValueError, match="one shape"):
        affinity_mimicking_loss(jnp.ones((3, 4)), jnp.ones((4, 3)))
    with pytest.raises(ValueError, match="NaN"):
        affinity_mimicking_loss(jnp.full((2, 2), jnp.nan), jnp.ones((2, 2)))
    with pytest.raises(ValueError, match="scale"):
        affinity_logits(jnp.ones((2, 3)), jnp.ones((2, 3)), scale=0.0)


def test_inherited_student_distills_better_than_random_on_digits():
    """Teacher ViT (width 32, 4 heads, MLP 64) trained on digits; student width 16, 2 heads, MLP 32. At 50 equal
    steps the student inherited by importance beats a random-init one, and affinity mimicking (teacher-student
    logit affinities over the batch x classes, both directions) beats label-only training from random init."""
    d = load_digits_split(images=True)
    xtr, ytr, xte, yte = map(jnp.asarray, d)
    teacher = ViT(patch_size=4, width=32, depth=1, num_heads=4, mlp_dim=64, num_classes=10)
    student = ViT(patch_size=4, width=16, depth=1, num_heads=2, mlp_dim=32, num_classes=10)

    def make_train(model, steps):
        tx = optax.adam(3e-3)

        @jax.jit
        def step(p, s, i, t_logits, w_ce, w_aff):  # jitted steps in a Python loop (faster than lax.scan on CPU)
            idx = jax.random.randint(jax.random.fold_in(jax.random.key(1), i), (64,), 0, xtr.shape[0])

            def lossf(p):
                lg = model.apply({"params": p}, xtr[idx])
                ce = optax.softmax_cross_entropy_with_integer_labels(lg, ytr[idx]).mean()
                return w_ce * ce + w_aff * affinity_mimicking_loss(lg, t_logits[idx])

            loss, g = jax.value_and_grad(lossf)(p)
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s, loss

        predict = jax.jit(lambda p, x: model.apply({"params": p}, x))

        def run(p, t_logits, w_ce, w_aff):
            s, losses = tx.init(p), []
            for i in range(steps):
                p, s, loss = step(p, s, i, t_logits, w_ce, w_aff)
                losses.append(loss)
            acc = float((np.asarray(predict(p, xte)).argmax(-1) == np.asarray(yte)).mean())
            return acc, np.asarray(jax.device_get(losses)), predict(p, xtr), p

        return run

    pt = jax.jit(teacher.init)(jax.random.key(0), xtr[:1])["params"]
    t_acc, _, t_logits, pt_trained = make_train(teacher, 150)(pt, jnp.zeros((xtr.shape[0], 10)), 1.0, 0.0)
    plan = plan_inheritance(pt_trained, "vit", teacher_heads=4, depth=1, num_heads=2, mlp_dim=32)
    random = jax.jit(student.init)(jax.random.key(2), xtr[:1])["params"]
    inherited = inherit(pt_trained, plan, "vit", like=random)
    run = make_train(student, 50)
    res = {name: run(p0, t_logits, w_ce, w_aff) for name, p0, w_ce, w_aff in
           (("inherited+aff", inherited, 0.0, 1.0), ("random+aff", random, 0.0, 1.0),
            ("random+ce", random, 1.0, 0.0))}
    accs = {k: float(v[0]) for k, v in res.items()}
    print(f"teacher {float(t_acc):.3f}; students after 50 steps: {accs}")
    assert float(t_acc) > 0.85
    assert accs["inherited+aff"] > accs["random+aff"] + 0.04
    assert accs["random+aff"] > accs["random+ce"] + 0.01
    # faster: the inherited student's distillation loss drops below the random student's final loss early
    li, lr = np.asarray(res["inherited+aff"][1]), np.asarray(res["random+aff"][1])
    assert np.argmax(li <= lr[-10:].mean()) < 30
