"""jaxmodels.perplexity.evaluate_perplexity: the GPTQ/AWQ non-overlapping-window perplexity.

References: a bigram model whose log-probabilities are a NumPy table (the whole evaluation re-done in float64
NumPy), the same GPT evaluated sharded over 8 devices and on one device, transformers' own loss on the committed
tiny decoder (``tests/data/perplexity_reference.npz``, made by ``scripts/make_perplexity_reference.py``), and the
tiny decoder's validation perplexity against the unigram baseline.
"""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodels.models import GPT
from jaxmodels.perplexity import evaluate_perplexity, perplexity_windows

DATA = Path(__file__).resolve().parents[1] / "data"


def _bigram(params, ids):
    return params["table"][ids]  # logits of the next token depend on the current one only


def _numpy_ppl(table, tokens, seq_len):
    m = table.max(1, keepdims=True)
    logp = table - m - np.log(np.exp(table - m).sum(1, keepdims=True))
    n = len(tokens) // seq_len
    w = tokens[: n * seq_len].reshape(n, seq_len)
    nll = -logp[w[:, :-1], w[:, 1:]]  # no pair crosses a window boundary
    return float(np.exp(nll.mean()))


def test_bigram_matches_numpy():
    rng = np.random.default_rng(0)
    table = rng.normal(size=(37, 37)) * 2
    tokens = rng.integers(0, 37, size=1000)
    ref = _numpy_ppl(table, tokens, 64)  # 15 windows, 40 tail tokens dropped
    params = {"table": jnp.asarray(table, jnp.float32)}
    for bs in (1, 4, 15, 32):  # 4, 32: last batch padded with weight-0 windows
        got = evaluate_perplexity(_bigram, params, tokens, 64, batch_size=bs, progress=False)
        # float32 logits and per-batch float32 sums of <= 32 * 63 terms: ~1e-6 relative
        np.testing.assert_allclose(got, ref, rtol=2e-6)
    # max_windows: the first windows only
    np.testing.assert_allclose(evaluate_perplexity(_bigram, params, tokens, 64, max_windows=3, progress=False),
                               _numpy_ppl(table, tokens[:192], 64), rtol=2e-6)
    assert perplexity_windows(tokens, 64).shape == (15, 64)


@pytest.fixture(scope="module")
def gpt():
    model = GPT(vocab_size=64, max_len=32, width=32, depth=1, num_heads=2, mlp_dim=64)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32), jnp.int32))["params"]
    tokens = np.random.default_rng(1).integers(0, 64, size=16 * 32 + 5)
    return model, params, tokens


def test_sharded_equals_single_device(gpt, mesh):
    model, params, tokens = gpt
    single = evaluate_perplexity(model, params, tokens, 32, batch_size=3, progress=False)
    n = mesh.shape["data"]
    sharded = evaluate_perplexity(model, params, tokens, 32, batch_size=n, mesh=mesh, progress=False)
    # the same per-token terms, summed in another order (per device, then across): float32 rounding only
    np.testing.assert_allclose(sharded, single, rtol=1e-5)
    assert 40 < single < 90  # a random-init model: close to uniform over 64 tokens


def test_errors(gpt, mesh):
    model, params, tokens = gpt
    with pytest.raises(ValueError, match="seq_len must be an integer >= 2"):
        evaluate_perplexity(model, params, tokens, 1)
    with pytest.raises(ValueError, match="1-D integer"):
        evaluate_perplexity(model, params, tokens.reshape(1, -1), 32)
    with pytest.raises(ValueError, match="make no window"):
        evaluate_perplexity(model, params, tokens[:31], 32)
    with pytest.raises(ValueError, match="vocab_size 64"):
        evaluate_perplexity(model, params, np.concatenate([[64], tokens]), 32, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate_perplexity(model, params, tokens, 32, batch_size=0)
    if mesh.shape["data"] > 1:
        with pytest.raises(ValueError, match="multiple of the mesh's data axis"):
            evaluate_perplexity(model, params, tokens, 32, batch_size=mesh.shape["data"] + 1, mesh=mesh)
    bad = {"table": jnp.full((64, 64), jnp.nan)}
    with pytest.raises(FloatingPointError, match="not finite"):
        evaluate_perplexity(_bigram, bad, tokens, 32, progress=False)


@pytest.fixture(scope="module")
def reference():
    with np.load(DATA / "perplexity_reference.npz") as f:
        return {k: f[k] for k in f.files}


@pytest.mark.parametrize("name,folder", [("hf_llama", DATA / "hf" / "llama"),
                                         ("tiny_decoder", DATA / "tiny_decoder")])
def test_matches_transformers_loss(reference, name, folder):
    """exp(mean of transformers' per-window ``labels=`` loss), float32 torch on the same (bf16 -> float32)
    weights: the same windows, the same shift, the same average."""
    from jaxmodels.models import load_pretrained

    model, params = load_pretrained(folder, dtype=jnp.float32, progress=False)
    got = evaluate_perplexity(model, params, reference[f"{name}/tokens"], int(reference[f"{name}/seq_len"]),
                              batch_size=4, progress=False)
    # float32 logits from two implementations (1e-5 parity, tests/jaxmodels/models) in a log-softmax averaged
    # over 124 / 1016 tokens: 1e-5 relative on the perplexity
    np.testing.assert_allclose(got, float(reference[f"{name}/ppl"]), rtol=1e-5)


def test_tiny_decoder_far_below_unigram():
    """The committed decoder (scripts/train_tiny_decoder.py) learned the corpus: its validation perplexity is far
    below the add-one unigram baseline of the train split's token frequencies."""
    from jaxmodels import text
    from jaxmodels.models import load_pretrained

    folder = DATA / "tiny_decoder"
    tok = text.load_tokenizer(folder)
    model, params = load_pretrained(folder, dtype=jnp.float32, progress=False)
    train, val = text.corpus_tokens(tok, "train"), text.corpus_tokens(tok, "validation")
    p = (np.bincount(train, minlength=tok.get_vocab_size()) + 1.0) / (len(train) + tok.get_vocab_size())
    unigram = float(np.exp(-np.mean(np.log(p[val]))))
    ppl = evaluate_perplexity(model, params, val, 128, batch_size=24, progress=False)
    assert ppl < 0.25 * unigram, (ppl, unigram)
