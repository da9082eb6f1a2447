"""RSQ: Rotate, Scale, then Quantize (Sung et al., 2025, "RSQ: Learning from Important Tokens Leads to Better
Quantized LLMs"; reference ylsung/rsq).

1. Rotate: every linear's input is rotated by a random Hadamard matrix R = H_n·diag(±1)/√n (orthogonal), applied
   online to the activations as QuaRot does before ``down_proj``: x W = (x R)(Rᵀ W). The model function is unchanged
   in float; the stored weight Rᵀ W has its outliers spread over all input features. (BERT is post-LN, so the
   residual stream itself cannot be rotated with the rotation folded into LayerNorm; every linear gets its own.)
   H_n for n = 2^k·m, m ∈ {1, 12}: Sylvester ⊗ Paley-I(12); other sizes fall back to a random orthogonal matrix.
2. Scale: token importance r_t = attention concentration, the attention a token receives summed over heads and
   queries, min/max-normalized per sequence to [r_min, r_max] = [1, 3] (the reference's ``OriginalAttentionWeighting``
   defaults); the Hessian becomes H = 2 Σ_t r_t x_t x_tᵀ / Σ_t r_t.
3. Quantize: GPTQ with that Hessian, in the rotated basis.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from .gptq import GPTQConfig, gptq

__all__ = ["RSQConfig", "rsq", "hadamard", "random_hadamard", "attention_concentration"]


@dataclasses.dataclass(frozen=True)
class RSQConfig:
    """RSQ's settings: the ``gptq`` config of step 3, ``rotate`` (step 1, the random Hadamard rotation),
    ``scale_tokens`` (step 2: token importance ``r_t`` min/max-normalized to ``[min_value, max_value]``, default
    ``[1, 3]``; False: the plain GPTQ Hessian) and the ``seed`` of the rotations' random signs. ``validate()`` raises
    on invalid settings."""

    gptq: GPTQConfig = GPTQConfig(bits=3, group_size=128, act_order=True)
    rotate: bool = True
    scale_tokens: bool = True
    min_value: float = 1.0
    max_value: float = 3.0
    seed: int = 0

    def validate(self):
        self.gptq.validate()
        if not 0 <= self.min_value <= self.max_value:
            raise ValueError(f"need 0 <= min_value <= max_value, got {self.min_value}, {self.max_value}")


def _paley12() -> np.ndarray:
    q = 11
    residues = {(i * i) % q for i in range(1, q)}
    chi = lambda a: 0 if a % q == 0 else (1 if a % q in residues else -1)
    Q = np.array([[chi(i - j) for j in range(q)] for i in range(q)], np.float64)
    S = np.zeros((12, 12))
    S[0, 1:] = 1
    S[1:, 0] = -1
    S[1:, 1:] = Q
    return S + np.eye(12)


def hadamard(n: int) -> np.ndarray | None:
    """A ±1 Hadamard matrix of order n (H Hᵀ = n I) for n = 2^k or 12·2^k, else None."""
    if n < 1:
        return None
    m = n
    while m % 2 == 0 and m > 1:
        m //= 2
    k = n // m
    if m == 1:
        base = np.ones((1, 1))
    elif m == 3 and k % 4 == 0:
        base, k = _paley12(), k // 4
    else:
        return None
    H = base
    S = np.array([[1.0, 1.0], [1.0, -1.0]])
    while H.shape[0] < n:
        H = np.kron(H, S)
    return H


def random_hadamard(n: int, seed: int) -> np.ndarray:
    """Orthogonal R = H_n diag(s) / √n with random signs s (random orthogonal when no H_n is known)."""
    rng = np.random.default_rng(seed)
    H = hadamard(n)
    if H is None:
        q, r = np.linalg.qr(rng.standard_normal((n, n)))
        return (q * np.sign(np.diag(r))).astype(np.float32)
    s = rng.choice([-1.0, 1.0], size=n)
    return (H * s[None, :] / np.sqrt(n)).astype(np.float32)


def attention_concentration(q, k, num_heads: int, token_mask, min_value=1.0, max_value=3.0, causal: bool = False):
    """r[b, t] = Σ_heads Σ_queries softmax(q kᵀ/√d_h + M)[b, h, :, t], min/max-normalized over each sequence's real
    tokens to [min_value, max_value]; padding tokens get 0. M masks padded keys, and future keys (key > query) when
    ``causal`` (decoders)."""
    B, T, D = q.shape
    dh = D // num_heads
    qh = q.reshape(B, T, num_heads, dh)
    kh = k.reshape(B, T, num_heads, dh)
    logits = jnp.einsum("bqhd,bkhd->bhqk", qh, kh).astype(jnp.float32) / jnp.sqrt(jnp.float32(dh))
    valid = token_mask > 0
    allowed = valid[:, None, None, :]
    if causal:
        allowed = allowed & jnp.tril(jnp.ones((T, T), bool))[None, None]
    logits = jnp.where(allowed, logits, jnp.finfo(jnp.float32).min)
    a = jax.nn.softmax(logits, axis=-1) * valid[:, None, :, None]  # only real queries count
    r = a.sum(axis=(1, 2))
    lo = jnp.where(valid, r, jnp.inf).min(1, keepdims=True)
    hi = jnp.where(valid, r, -jnp.inf).max(1, keepdims=True)
    r = (r - lo) / jnp.maximum(hi - lo, 1e-12) * (max_value - min_value) + min_value
    return jnp.where(valid, jnp.clip(r, min_value, max_value), 0.0)


def rsq(params, model, calib_batch, config: RSQConfig = RSQConfig(), *, progress: bool | None = None):
    """RSQ every linear of ``model``. Returns ``(quantized_params, report)``; the params hold the effective kernels
    R·Q(RᵀW) (the function of the deployed model with its online rotations); the report per layer also holds the
    stored rotated kernel's grid and ``rotation_seed`` (R = ``random_hadamard(n, rotation_seed)``)."""
    from .engine import RotationTransform

    config.validate()
    transforms = []
    if config.rotate:
        count = [0]

        def rotation(path, n):
            seed = config.seed * 1000003 + count[0]
            count[0] += 1
            return random_hadamard(n, seed), seed

        transforms.append(RotationTransform(rotation))

    weights_fn = None
    if config.scale_tokens:
        qn, kn = model.attention

        def weights_fn(rec, ctx):
            q, k = (rec[qn][1], rec[kn][1]) if model.attention_fn is None else model.attention_fn(rec)
            return attention_concentration(q, k, model.num_heads, model.token_weight(ctx), config.min_value,
                                           config.max_value, causal=model.causal)

    out, rep = gptq(params, model, calib_batch, config.gptq, progress=progress, token_weights_fn=weights_fn,
                    transforms=transforms)
    for t in transforms:
        for p, seed in t.seeds.items():
            rep["layers"][p]["rotation_seed"] = seed
    rep["method"] = "rsq"
    rep["config"] = dataclasses.asdict(config)
    return out, rep
