"""Sparse Model Soups, Robust Weight Signatures and MC-SMoE expert merging: NumPy references written from the
papers' equations, invariants, sharded == unsharded, bf16 in/out, and input validation.

Tolerances: the JAX kernels and the NumPy references both compute in float32 with the same operations in a
different order, so results agree to a few ulps of O(1) values (rtol=atol=1e-5 leaves ~100 ulps of margin).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import merging
from jaxmodels.tree import flatten
from merging.sparse_soup import sparse_soup
from tests.merging.helpers import assert_trees_close, assert_trees_equal, make_tree, np_tree, shard_tree

TOL = dict(rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Sparse Model Soups

def sparse_family(n, seed=0, density=0.3, dtype=np.float32):
    """n models retrained from one pruned net: same magnitude mask (IMP keeps the largest weights), different values."""
    base = make_tree(seed)
    rng = np.random.default_rng(seed + 100)
    masks = jax.tree.map(lambda b: np.abs(b) >= np.quantile(np.abs(b), 1 - density), base)
    models = [jax.tree.map(lambda b, m: ((b + 0.1 * rng.standard_normal(b.shape)) * m).astype(dtype), base, masks)
              for _ in range(n)]
    return masks, models


def np_sparse_soup(models, weights, normalize=True):
    w = np.asarray(weights, np.float32)
    out = {}
    for p, x0 in flatten(np_tree(models[0])).items():
        xs = np.stack([flatten(np_tree(m))[p] for m in models])
        avg = np.tensordot(w, xs, axes=1)
        if normalize:
            avg = avg / w.sum()
        out[p] = avg * (x0 != 0)
    return out


def test_sparse_soup_matches_numpy_reference_and_keeps_the_mask():
    masks, models = sparse_family(3)
    weights = [1.0, 2.0, 0.5]
    got = sparse_soup(None, models, weights=weights)
    want = np_sparse_soup(models, weights)
    for p, g in flatten(got).items():
        np.testing.assert_allclose(np.asarray(g), want[p], **TOL)
    # sparsity preserved exactly: zero where the mask is off, and the averaged survivors are (generically) non-zero
    for p, g in flatten(got).items():
        m = flatten(masks)[p]
        assert np.all(np.asarray(g)[~m] == 0)
        assert np.all(np.asarray(g)[m] != 0)
    dense = sum(int(np.sum(np.asarray(x) != 0)) for x in jax.tree.leaves(got))
    assert dense == sum(int(np.sum(m)) for m in jax.tree.leaves(masks))


def test_sparse_soup_explicit_mask_and_unnormalized():
    masks, models = sparse_family(2, seed=3)
    got = sparse_soup(None, models, weights=[0.3, 0.7], normalize=False, mask=masks)
    want = np_sparse_soup(models, [0.3, 0.7], normalize=False)
    for p, g in flatten(got).items():
        np.testing.assert_allclose(np.asarray(g), want[p], **TOL)


def test_sparse_soup_of_copies_is_the_model():
    _, models = sparse_family(1)
    got = sparse_soup(None, [models[0]] * 4)
    # (4x)/4 in float32: x + x + x + x is exact for these magnitudes, /4 is exact (power of two)
    assert_trees_equal(got, models[0])


def test_sparse_soup_registered():
    assert merging.get("sparse_soup").fn is sparse_soup


def test_sparse_soup_sharded_equals_unsharded(mesh):
    _, models = sparse_family(3)
    want = sparse_soup(None, models)
    got = sparse_soup(None, [shard_tree(m, mesh) for m in models])
    assert_trees_close(got, want, rtol=1e-6, atol=1e-7)
    assert_trees_equal(jax.tree.map(lambda x: np.asarray(x) == 0, got), jax.tree.map(lambda x: np.asarray(x) == 0, want))


def test_sparse_soup_bf16_in_bf16_out():
    masks, models = sparse_family(2, dtype=jnp.bfloat16)
    got = sparse_soup(None, models)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(got))
    want = sparse_soup(None, [jax.tree.map(lambda x: x.astype(jnp.float32), m) for m in models])
    # float32 soup of the same bf16 values rounded once to bf16: within 1 bf16 ulp (2^-8 relative)
    assert_trees_close(got, want, rtol=2 ** -7, atol=1e-6)
    for p, g in flatten(got).items():
        assert np.all(np.asarray(g, np.float32)[~flatten(masks)[p]] == 0)


def test_sparse_soup_digits_experiment_soup_of_retrained_sparse_models():
    """The paper's setting in miniature: train an MLP on digits, prune 80% of each kernel by magnitude, retrain 3
    copies under the same mask with different batch orders, soup them. Measured (CPU): ingredients test acc
    0.949 / 0.955 / 0.958 (loss 0.151 / 0.148 / 0.152), soup acc 0.955 (loss 0.149), pruned-not-retrained 0.762."""
    import optax

    from jaxmodels.datasets import load_digits_split
    from jaxmodels.models.mlp import MLP
    from jaxmodels.train import accuracy, init_train_state, make_train_step, softmax_cross_entropy

    d = load_digits_split()
    model = MLP(features=(64,))

    def apply(p, x):
        return model.apply({"params": p}, x)

    def train(params, steps, seed, lr, mask=None):
        tx = optax.adam(lr)
        st = init_train_state(params, tx)
        step = make_train_step(apply, tx, donate=False)
        rng = np.random.default_rng(seed)
        for _ in range(steps):
            idx = rng.integers(0, len(d.x_train), 64)
            st, _ = step(st, d.x_train[idx], d.y_train[idx])
            if mask is not None:
                st = st._replace(params=jax.tree.map(lambda p, m: p * m, st.params, mask))
        return st.params

    def acc(p):
        return float(accuracy(apply(p, d.x_test), d.y_test))

    def loss(p):
        return float(softmax_cross_entropy(apply(p, d.x_test), d.y_test))

    dense = train(model.init(jax.random.key(0), d.x_train[:1])["params"], 200, 0, 1e-2)
    mask = {k: {"kernel": np.abs(np.asarray(v["kernel"])) >= np.quantile(np.abs(np.asarray(v["kernel"])), 0.8),
                "bias": np.ones(v["bias"].shape, bool)} for k, v in dense.items()}
    pruned = jax.tree.map(lambda p, m: p * m, dense, mask)
    ings = [train(pruned, 300, s, 3e-3, mask) for s in (1, 2, 3)]
    soup = sparse_soup(None, ings, mask=mask)
    # sparsity kept exactly: 80% of every kernel is zero in the soup
    for k in soup:
        assert np.all(np.asarray(soup[k]["kernel"])[~mask[k]["kernel"]] == 0)
    # the soup is at least as good as a typical ingredient (loss below the ingredients' mean; accuracy no worse than
    # the worst ingredient) and far better than the pruned, not retrained, network
    assert loss(soup) <= np.mean([loss(p) for p in ings])
    assert acc(soup) >= min(acc(p) for p in ings)
    assert acc(soup) > acc(pruned) + 0.1


def test_sparse_soup_rejects_different_masks_naming_the_path():
    _, models = sparse_family(2)
    bad = jax.tree.map(lambda x: x, models[1])
    bad["out"]["kernel"] = bad["out"]["kernel"].copy()
    z = np.argwhere(bad["out"]["kernel"] == 0)[0]
    bad["out"]["kernel"][tuple(z)] = 1.0
    with pytest.raises(ValueError, match=r"model_1 differs from model_0 at 'out/kernel'"):
        sparse_soup(None, [models[0], bad])
    masks, _ = sparse_family(2)
    with pytest.raises(ValueError, match="outside `mask`"):
        sparse_soup(None, [models[0], bad], mask=masks)
    # an unused base is ignored, as by linear (merging's package docstring)
    np.testing.assert_array_equal(sparse_soup(models[0], models)["out"]["kernel"],
                                  sparse_soup(None, models)["out"]["kernel"])
    with pytest.raises(ValueError, match="sum to zero"):
        sparse_soup(None, models, weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="entries"):
        sparse_soup(None, models, weights=[1.0, 1.0, 1.0])


# ---------------------------------------------------------------------------------------------------------------
# Robust Weight Signatures

from merging.robust_signatures import PatchUndo, extract_signature, patch, unpatch  # noqa: E402

SHALLOW = r"^dense/"


def rws_family(seed=0, dtype=np.float32):
    clean = make_tree(seed, dtype=dtype)
    robust = [jax.tree.map(lambda c, t: (c + t).astype(dtype), clean, make_tree(seed + 1 + i, 0.05))
              for i in range(2)]
    return clean, robust


def np_quant(d, bits):
    q = 2 ** (bits - 1) - 1
    amax = np.abs(d).max()
    s = amax / q if amax > 0 else 1.0
    return (np.clip(np.round(d / s), -q, q) * s).astype(np.float32)


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_extract_signature_matches_numpy_reference(bits):
    clean, (robust, _) = rws_family()
    sig = extract_signature(clean, robust, include=SHALLOW, bits=bits)
    assert sorted(sig) == ["dense/bias", "dense/kernel"]
    for p, d in sig.items():
        want = flatten(np_tree(robust))[p] - flatten(np_tree(clean))[p]
        if bits is not None:
            want = np_quant(want, bits)
            # a b-bit grid: at most 2^b - 1 distinct values
            assert len(np.unique(np.asarray(d))) <= 2 ** bits - 1
        np.testing.assert_allclose(np.asarray(d), want, **TOL)


def test_patch_matches_numpy_and_only_selected_layers_change():
    clean, robust = rws_family()
    sigs = [extract_signature(clean, r, include=SHALLOW) for r in robust]
    sigs[1] = {"dense/kernel": sigs[1]["dense/kernel"]}  # a signature may cover fewer layers
    c = [0.7, -0.4]
    got = flatten(patch(clean, sigs, c))
    ref = flatten(np_tree(clean))
    for p, g in got.items():
        want = ref[p] + sum(ci * np.asarray(s[p]) for ci, s in zip(c, sigs) if p in s)
        if p.startswith("dense/"):
            np.testing.assert_allclose(np.asarray(g), want, **TOL)
            assert not np.array_equal(np.asarray(g), ref[p])
        else:
            np.testing.assert_array_equal(np.asarray(g), ref[p])
    # patching the clean model with its own robust signature (c=1) gives the robust shallow layers back
    full = flatten(patch(clean, sigs[0], 1.0))
    for p in sigs[0]:
        np.testing.assert_allclose(np.asarray(full[p]), flatten(np_tree(robust[0]))[p], **TOL)


def test_unpatch_is_exact_with_undo_and_within_rounding_without():
    clean, robust = rws_family(seed=5)
    sigs = [extract_signature(clean, r, include=SHALLOW, bits=8) for r in robust]
    patched, undo = patch(clean, sigs, [1.3, 0.9], return_undo=True)
    assert isinstance(undo, PatchUndo) and sorted(undo.original) == ["dense/bias", "dense/kernel"]
    assert_trees_equal(unpatch(patched, sigs, [1.3, 0.9], undo=undo), clean)  # bit for bit
    # arithmetic inverse: (x + d) - d is within 1 float32 ulp of x for |d| <~ |x| (2 ulps of O(1) values)
    assert_trees_close(unpatch(patched, sigs, [1.3, 0.9]), clean, rtol=1e-6, atol=5e-7)
    # a patched model changed since cannot be restored "exactly"
    tampered = jax.tree.map(lambda x: x, patched)
    tampered["dense"]["bias"] = tampered["dense"]["bias"] + 1.0
    with pytest.raises(ValueError, match="dense/bias"):
        unpatch(tampered, sigs, [1.3, 0.9], undo=undo)
    with pytest.raises(ValueError, match="not what patch"):
        unpatch(patched, sigs, [1.3, 0.8], undo=undo)


def test_rws_sharded_equals_unsharded(mesh):
    clean, robust = rws_family()
    sigs = [extract_signature(clean, r, include=SHALLOW, bits=8) for r in robust]
    want = patch(clean, sigs, [0.5, 0.5])
    sc, sr = shard_tree(clean, mesh), [shard_tree(r, mesh) for r in robust]
    ssigs = [extract_signature(sc, r, include=SHALLOW, bits=8) for r in sr]
    for a, b in zip(ssigs, sigs):
        assert_trees_close(a, b, rtol=1e-6, atol=1e-7)
    got, undo = patch(sc, ssigs, [0.5, 0.5], return_undo=True)
    assert_trees_close(got, want, rtol=1e-6, atol=1e-7)
    assert_trees_equal(unpatch(got, ssigs, [0.5, 0.5], undo=undo), clean)


def test_rws_bf16_model_keeps_dtype():
    clean, robust = rws_family(dtype=jnp.bfloat16)
    sig = extract_signature(clean, robust[0], include=SHALLOW)
    assert all(d.dtype == jnp.float32 for d in sig.values())
    patched, undo = patch(clean, sig, 1.0, return_undo=True)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(patched))
    # clean + (robust - clean) in float32, rounded once to bf16, is the bf16 robust value exactly
    for p in sig:
        np.testing.assert_array_equal(np.asarray(flatten(patched)[p]), np.asarray(flatten(robust[0])[p]))
    assert_trees_equal(unpatch(patched, sig, 1.0, undo=undo), clean)


def test_rws_digits_experiment_shallow_signature_carries_robustness():
    """The paper's claim in miniature: fine-tune a clean digits MLP on Gaussian-noise-corrupted inputs; the 8-bit
    signature of the first layer alone, patched onto the clean model, recovers most of the robust model's accuracy
    on noisy test digits, while the signature of the last layer does not. Measured (CPU): noisy-test accuracy
    clean 0.465, robust 0.628, clean + Dense_0 signature 0.619, clean + Dense_2 signature 0.488; clean-test
    accuracy of the patched model 0.947 (robust 0.949)."""
    import optax

    from jaxmodels.datasets import load_digits_split
    from jaxmodels.models.mlp import MLP
    from jaxmodels.train import accuracy, init_train_state, make_train_step

    d = load_digits_split()
    model = MLP(features=(64, 64))

    def apply(p, x):
        return model.apply({"params": p}, x)

    def corrupt(x, seed):
        return np.clip(x + 0.5 * np.random.default_rng(seed).standard_normal(x.shape), 0, 1).astype(np.float32)

    def train(params, steps, seed, lr, noisy=False):
        tx = optax.adam(lr)
        st = init_train_state(params, tx)
        step = make_train_step(apply, tx, donate=False)
        rng = np.random.default_rng(seed)
        for i in range(steps):
            idx = rng.integers(0, len(d.x_train), 64)
            x = corrupt(d.x_train[idx], seed * 10000 + i) if noisy else d.x_train[idx]
            st, _ = step(st, x, d.y_train[idx])
        return st.params

    x_noisy = corrupt(d.x_test, 999)

    def acc(p, x):
        return float(accuracy(apply(p, x), d.y_test))

    clean = train(model.init(jax.random.key(0), d.x_train[:1])["params"], 300, 0, 1e-2)
    robust = train(clean, 300, 1, 1e-3, noisy=True)
    shallow = extract_signature(clean, robust, include=r"^Dense_0/", bits=8)
    deep = extract_signature(clean, robust, include=r"^Dense_2/", bits=8)
    patched, undo = patch(clean, shallow, 1.0, return_undo=True)
    a_clean, a_robust = acc(clean, x_noisy), acc(robust, x_noisy)
    a_shallow, a_deep = acc(patched, x_noisy), acc(patch(clean, deep, 1.0), x_noisy)
    # margins are several test examples (1 example = 0.0022) wider than the measured gaps
    assert a_robust > a_clean + 0.1
    assert a_shallow >= a_robust - 0.03
    assert a_shallow > a_deep + 0.05
    assert acc(patched, d.x_test) > 0.9
    assert_trees_equal(unpatch(patched, shallow, 1.0, undo=undo), clean)


def test_rws_bad_inputs():
    clean, robust = rws_family()
    with pytest.raises(ValueError, match="bits"):
        extract_signature(clean, robust[0], include=SHALLOW, bits=1)
    with pytest.raises(ValueError, match="selects no leaf"):
        extract_signature(clean, robust[0], include="^nothing")
    with pytest.raises(ValueError, match="robust"):
        extract_signature(clean, {"dense": clean["dense"]}, include=SHALLOW)
    sig = extract_signature(clean, robust[0], include=SHALLOW)
    with pytest.raises(ValueError, match="entries"):
        patch(clean, [sig], [1.0, 2.0])
    with pytest.raises(ValueError, match="lacks"):
        patch({"out": clean["out"]}, sig)
    with pytest.raises(ValueError, match="finite"):
        patch(clean, sig, float("nan"))


# ---------------------------------------------------------------------------------------------------------------
# MC-SMoE expert merging

from merging.moe_expert_merge import MoEMerge, expert_usage, mc_smoe_merge  # noqa: E402

E = 8


def moe_experts(seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return {"wi": rng.standard_normal((E, 4, 6)).astype(dtype), "wo": rng.standard_normal((E, 6, 4)).astype(dtype),
            "b": rng.standard_normal((E, 6)).astype(dtype)}


def planted_logits(seed=0, tokens=400):
    """Two latent routing directions: experts 1 and 5 are the popular ones; 0, 2, 3 follow 1's logit pattern and
    4, 6, 7 follow 5's (plus noise), so MC-SMoE must find groups {0,1,2,3} and {4,5,6,7}."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((tokens, 2)).astype(np.float32)
    owner = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    offset = np.array([-1.0, 2.0, -1.5, -0.5, -1.0, 2.2, -0.8, -1.2], np.float32)
    return (z[:, owner] * 2.0 + offset + 0.3 * rng.standard_normal((tokens, E))).astype(np.float32)


def np_mc_smoe(experts, logits, num_groups, top_k):
    t, e = logits.shape
    top = np.argsort(-logits, axis=1, kind="stable")[:, :top_k]
    freq = np.zeros(e, np.float32)
    for row in top:
        freq[row] += 1
    freq /= t
    dom = np.sort(np.argsort(-freq, kind="stable")[:num_groups])
    group = np.empty(e, np.int64)
    for i in range(e):
        if i in dom:
            group[i] = list(dom).index(i)
        else:
            sims = [logits[:, i] @ logits[:, d] / (np.linalg.norm(logits[:, i]) * np.linalg.norm(logits[:, d]))
                    for d in dom]
            group[i] = int(np.argmax(sims))
    merged = {}
    for k, x in experts.items():
        out = []
        for g in range(num_groups):
            members = np.flatnonzero(group == g)
            w = freq[members] if freq[members].sum() > 0 else np.ones(len(members), np.float32)
            out.append(np.tensordot(w / w.sum(), np.asarray(x, np.float32)[members], axes=1))
        merged[k] = np.stack(out)
    return merged, group, dom, freq


@pytest.mark.parametrize("top_k", [1, 2])
def test_mc_smoe_matches_numpy_reference_on_planted_groups(top_k):
    experts, logits = moe_experts(), planted_logits()
    got = mc_smoe_merge(experts, logits, 2, top_k=top_k)
    assert isinstance(got, MoEMerge)
    want, group, dom, freq = np_mc_smoe(experts, logits, 2, top_k)
    np.testing.assert_allclose(np.asarray(got.frequency), freq, rtol=0, atol=1e-7)  # counts / T, exact in f32
    np.testing.assert_array_equal(np.asarray(got.dominant), dom)
    np.testing.assert_array_equal(np.asarray(got.group_of_expert), group)
    if top_k == 1:  # the planted structure is recovered
        np.testing.assert_array_equal(dom, [1, 5])
        np.testing.assert_array_equal(group, [0, 0, 0, 0, 1, 1, 1, 1])
    for k in experts:
        assert got.experts[k].shape == (2,) + experts[k].shape[1:]
        np.testing.assert_allclose(np.asarray(got.experts[k]), want[k], **TOL)


def test_mc_smoe_identical_experts_unchanged():
    one = moe_experts(3)
    experts = {k: np.repeat(v[:1], E, axis=0) for k, v in one.items()}
    got = mc_smoe_merge(experts, planted_logits(1), 3, top_k=2)
    # a convex combination of identical rows: Σ w_e x with Σ w_e = 1 up to float32 rounding (a few ulps of O(1))
    for k, v in experts.items():
        np.testing.assert_allclose(np.asarray(got.experts[k]), np.repeat(v[:1], 3, axis=0), rtol=1e-6, atol=1e-6)


def test_mc_smoe_frequency_weights_respected():
    # 2 experts, one group; expert 0 wins 3 of 4 tokens -> merged = 0.75 W_0 + 0.25 W_1 (not the plain mean)
    experts = {"w": np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)}
    logits = np.array([[2.0, 1.0], [3.0, 0.0], [1.0, 0.5], [0.0, 1.0]], np.float32)
    got = mc_smoe_merge(experts, logits, 1)
    np.testing.assert_array_equal(np.asarray(got.frequency), [0.75, 0.25])
    np.testing.assert_allclose(np.asarray(got.experts["w"]), [[0.75, 0.25]], rtol=0, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(got.group_of_expert), [0, 0])
    np.testing.assert_array_equal(np.asarray(expert_usage(logits, 2)), [1.0, 1.0])
    # num_groups = E: every expert its own group, weights untouched
    got = mc_smoe_merge(experts, logits, 2)
    np.testing.assert_array_equal(np.asarray(got.experts["w"]), experts["w"])


def test_mc_smoe_sharded_equals_unsharded(mesh):
    experts, logits = moe_experts(), planted_logits()
    want = mc_smoe_merge(experts, logits, 3, top_k=2)
    got = mc_smoe_merge(shard_tree(experts, mesh), shard_tree(logits, mesh), 3, top_k=2)
    np.testing.assert_array_equal(np.asarray(got.group_of_expert), np.asarray(want.group_of_expert))
    # same float32 program partitioned over devices: reductions may re-associate (a few ulps)
    assert_trees_close(got.experts, want.experts, rtol=1e-5, atol=1e-6)


def test_mc_smoe_bf16_in_bf16_out():
    experts, logits = moe_experts(dtype=jnp.bfloat16), planted_logits()
    got = mc_smoe_merge(experts, logits, 2)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(got.experts))
    want = mc_smoe_merge(jax.tree.map(lambda x: x.astype(jnp.float32), experts), logits, 2)
    assert_trees_close(got.experts, want.experts, rtol=2 ** -7, atol=1e-2)  # one bf16 rounding of the f32 merge


def test_mc_smoe_bad_inputs():
    experts, logits = moe_experts(), planted_logits()
    with pytest.raises(ValueError, match="num_groups"):
        mc_smoe_merge(experts, logits, 0)
    with pytest.raises(ValueError, match="top_k"):
        mc_smoe_merge(experts, logits, 2, top_k=9)
    with pytest.raises(ValueError, match="router_logits has 7 experts"):
        mc_smoe_merge(experts, logits[:, :7], 2)
    with pytest.raises(ValueError, match="leaf 'wo' has leading .expert. axis 5, expected 8"):
        mc_smoe_merge({**experts, "wo": experts["wo"][:5]}, logits, 2)
    bad = logits.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="finite"):
        mc_smoe_merge(experts, bad, 2)


from merging.moe_expert_merge import align_experts, merge_expert_groups  # noqa: E402
from merging.permutation import permutation_spec_from_axes_to_perm  # noqa: E402

# one expert of moe_experts(): x -> relu(x wi + b) wo, hidden units on wi's columns, b, wo's rows
EXPERT_SPEC = permutation_spec_from_axes_to_perm({"wi": (None, "h"), "b": ("h",), "wo": ("h", None)})


def _expert_fn(experts, e, x):
    return np.maximum(x @ np.asarray(experts["wi"][e], np.float32) + np.asarray(experts["b"][e], np.float32), 0) \
        @ np.asarray(experts["wo"][e], np.float32)


def test_align_experts_recovers_a_hidden_permutation_and_preserves_every_expert():
    experts = moe_experts(4)
    rng = np.random.default_rng(0)
    # expert 3 is expert 1 with its hidden units shuffled: alignment to dominant 1 must undo the shuffle exactly
    perm = rng.permutation(6)
    experts["wi"][3], experts["b"][3], experts["wo"][3] = experts["wi"][1][:, perm], experts["b"][1][perm], \
        experts["wo"][1][perm]
    group = np.array([0, 0, 1, 0, 1, 1, 0, 1])
    dominant = np.array([1, 4])
    got = align_experts(experts, group, dominant, EXPERT_SPEC)
    for k in experts:
        np.testing.assert_array_equal(np.asarray(got[k][3]), experts[k][1])
        for d in dominant:
            np.testing.assert_array_equal(np.asarray(got[k][d]), experts[k][d])
    x = rng.standard_normal((5, 4)).astype(np.float32)
    for e in range(E):  # a re-indexing of hidden units: the same function (same sums in another order)
        np.testing.assert_allclose(_expert_fn(got, e, x), _expert_fn(experts, e, x), rtol=1e-5, atol=1e-5)
    # the pieces compose to mc_smoe_merge(align_spec=...)
    logits = planted_logits()
    mc = mc_smoe_merge(experts, logits, 2, top_k=2, align_spec=EXPERT_SPEC)
    aligned = align_experts(experts, mc.group_of_expert, mc.dominant, EXPERT_SPEC)
    assert_trees_equal(mc.experts, merge_expert_groups(aligned, mc.group_of_expert, mc.frequency))


def test_merge_expert_groups_matches_numpy_and_handles_zero_weight_groups():
    experts = moe_experts(5)
    group = np.array([2, 0, 1, 0, 2, 1, 1, 0])
    w = np.array([0.5, 0.0, 0.0, 2.0, 1.5, 0.0, 0.0, 1.0], np.float32)  # group 1 has only zero weights -> uniform
    got = merge_expert_groups(experts, group, w)
    for k, v in experts.items():
        want = []
        for g in range(3):
            m = np.flatnonzero(group == g)
            ww = w[m] if w[m].sum() > 0 else np.ones(len(m), np.float32)
            want.append(np.tensordot(ww / ww.sum(), v[m], axes=1))
        np.testing.assert_allclose(np.asarray(got[k]), np.stack(want), **TOL)
    uniform = merge_expert_groups(experts, group, np.ones(E))
    np.testing.assert_allclose(np.asarray(uniform["b"][0]), experts["b"][[1, 3, 7]].mean(0), **TOL)
    with pytest.raises(ValueError, match="non-negative"):
        merge_expert_groups(experts, group, -w)
    with pytest.raises(ValueError, match="no empty group"):
        merge_expert_groups(experts, np.array([0, 0, 2, 2, 0, 2, 0, 2]), w)
    with pytest.raises(ValueError, match="8 integers"):
        merge_expert_groups(experts, group[:7], w)


def test_mc_smoe_alignment_sharded_and_bad_specs(mesh):
    experts, logits = moe_experts(), planted_logits()
    want = mc_smoe_merge(experts, logits, 3, top_k=2, align_spec=EXPERT_SPEC)
    got = mc_smoe_merge(shard_tree(experts, mesh), shard_tree(logits, mesh), 3, top_k=2, align_spec=EXPERT_SPEC)
    assert_trees_close(got.experts, want.experts, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="without the expert axis"):
        mc_smoe_merge(experts, logits, 2, align_spec=permutation_spec_from_axes_to_perm(
            {"wi": (None, None, "h"), "b": (None, "h"), "wo": (None, "h", None)}))
    with pytest.raises(ValueError, match="not a leaf"):
        mc_smoe_merge(experts, logits, 2, align_spec=permutation_spec_from_axes_to_perm({"w_in": (None, "h")}))
    with pytest.raises(TypeError, match="PermutationSpec"):
        mc_smoe_merge(experts, logits, 2, align_spec={"wi": (None, "h")})
    with pytest.raises(ValueError, match="dominant"):
        align_experts(experts, np.array([0, 0, 0, 0, 1, 1, 1, 1]), np.array([5, 1]), EXPERT_SPEC)
