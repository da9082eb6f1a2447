"""Modern (continuous) Hopfield layers: Ramsauer et al., "Hopfield Networks is All You Need" (ICLR 2021).

With stored patterns ``X = (x_1, ..., x_N)`` (columns) and a state (query) pattern ``xi``, one update of the modern
Hopfield network with energy ``E = -lse(beta, X^T xi) + xi^T xi / 2 + const`` is::

    xi_new = X softmax(beta X^T xi)

In row layout (``X`` is ``[N, d]``, queries ``R`` are ``[M, d]``) this is ``softmax(beta R X^T) X``. The layer
variants follow the paper's Section 3 / the ``hopfield-layers`` package:

* :class:`Hopfield` — state patterns ``R`` and stored patterns ``Y`` are inputs; with projections
  ``Z = softmax(beta (R W_Q)(Y W_K)^T) (Y W_V)`` then ``Z W_O``; the update is iterated ``update_steps`` times in the
  associative (key) space before the final retrieval. ``use_projections=False`` gives the raw update above.
* :class:`HopfieldPooling` — the state pattern(s) are learned (a static query), the stored patterns are the input
  set: ``Z = softmax(beta Q K^T) V`` pools ``N`` instances into ``num_queries`` vectors.
* :class:`HopfieldLayer` — the stored patterns are learned (a lookup table), the state patterns are the input.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

__all__ = ["hopfield_update", "Hopfield", "HopfieldPooling", "HopfieldLayer"]


def hopfield_update(stored: jax.Array, query: jax.Array, beta: float | jax.Array, steps: int = 1) -> jax.Array:
    """``xi <- X softmax(beta X^T xi)`` applied ``steps`` times.

    ``stored``: ``[..., N, d]`` patterns (rows); ``query``: ``[..., M, d]`` state patterns (rows); returns ``[..., M, d]``.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if stored.shape[-1] != query.shape[-1]:
        raise ValueError(f"pattern widths differ: stored {stored.shape}, query {query.shape}")
    xi = query
    for _ in range(steps):
        attn = jax.nn.softmax(beta * jnp.einsum("...md,...nd->...mn", xi, stored), axis=-1)
        xi = jnp.einsum("...mn,...nd->...md", attn, stored)
    return xi


class Hopfield(nn.Module):
    """Hopfield association ``Z = softmax(beta (R W_Q)(Y W_K)^T) (Y W_V) W_O`` (Ramsauer et al. 2021, eq. (10)),
    multi-head; ``beta`` defaults to ``1/sqrt(head_dim)``.

    ``__call__(state, stored)``: ``state`` ``[B, M, d_r]``, ``stored`` ``[B, N, d_y]`` -> ``[B, M, out_features]``
    (``out_features`` defaults to ``d_r``). ``update_steps > 1`` first iterates ``q <- softmax(beta q K^T) K``.
    ``use_projections=False`` is the plain update ``xi_new = Y^T softmax(beta Y xi)`` (needs ``d_r == d_y``).
    ``return_attention=True`` also returns the association weights ``[B, heads, M, N]``.
    """

    hidden_features: int | None = None
    out_features: int | None = None
    num_heads: int = 1
    beta: float | None = None
    update_steps: int = 1
    use_projections: bool = True
    return_attention: bool = False

    @nn.compact
    def __call__(self, state, stored):
        if self.update_steps < 1:
            raise ValueError(f"update_steps must be >= 1, got {self.update_steps}")
        if state.ndim != 3 or stored.ndim != 3 or state.shape[0] != stored.shape[0]:
            raise ValueError(f"expected state [B, M, d] and stored [B, N, d], got {state.shape} and {stored.shape}")
        if not self.use_projections:
            beta = 1.0 if self.beta is None else self.beta
            if self.num_heads != 1:
                raise ValueError("use_projections=False supports num_heads=1 only")
            q = hopfield_update(stored, state, beta, self.update_steps - 1) if self.update_steps > 1 else state
            attn = jax.nn.softmax(beta * jnp.einsum("bmd,bnd->bmn", q, stored), -1)
            out = jnp.einsum("bmn,bnd->bmd", attn, stored)
            return (out, attn[:, None]) if self.return_attention else out
        hidden = self.hidden_features or state.shape[-1]
        if hidden % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads} must divide hidden_features={hidden}")
        hd = hidden // self.num_heads
        beta = 1.0 / jnp.sqrt(hd) if self.beta is None else self.beta
        b, m, _ = state.shape
        n = stored.shape[1]
        q = nn.Dense(hidden, name="query")(state).reshape(b, m, self.num_heads, hd)
        k = nn.Dense(hidden, name="key")(stored).reshape(b, n, self.num_heads, hd)
        v = nn.Dense(hidden, name="value")(stored).reshape(b, n, self.num_heads, hd)
        for _ in range(self.update_steps - 1):
            a = jax.nn.softmax(beta * jnp.einsum("bmhd,bnhd->bhmn", q, k), -1)
            q = jnp.einsum("bhmn,bnhd->bmhd", a, k)
        attn = jax.nn.softmax(beta * jnp.einsum("bmhd,bnhd->bhmn", q, k), -1)
        z = jnp.einsum("bhmn,bnhd->bmhd", attn, v).reshape(b, m, hidden)
        out = nn.Dense(self.out_features or state.shape[-1], name="out")(z)
        return (out, attn) if self.return_attention else out


class HopfieldPooling(nn.Module):
    """Hopfield pooling with a learned static state pattern ``Q`` (``[num_queries, d]``):
    ``Z = softmax(beta (Q W_Q)(Y W_K)^T)(Y W_V) W_O``. Input ``[B, N, d]`` -> ``[B, num_queries * out]``
    (flattened, as in the paper's MIL pooling)."""

    num_queries: int = 1
    hidden_features: int | None = None
    out_features: int | None = None
    num_heads: int = 1
    beta: float | None = None
    update_steps: int = 1

    @nn.compact
    def __call__(self, stored):
        if stored.ndim != 3:
            raise ValueError(f"expected [B, N, d], got {stored.shape}")
        d = stored.shape[-1]
        q = self.param("query", nn.initializers.normal(1.0 / jnp.sqrt(d)), (self.num_queries, d))
        q = jnp.broadcast_to(q.astype(stored.dtype), (stored.shape[0], self.num_queries, d))
        z = Hopfield(self.hidden_features, self.out_features, self.num_heads, self.beta, self.update_steps,
                     name="hopfield")(q, stored)
        return z.reshape(stored.shape[0], -1)


class HopfieldLayer(nn.Module):
    """Hopfield lookup with learned stored patterns ``Y`` (``[num_patterns, d]``) and the input as state patterns:
    ``Z = softmax(beta (R W_Q)(Y W_K)^T)(Y W_V) W_O``. Input ``[B, M, d]`` -> ``[B, M, out]``."""

    num_patterns: int = 16
    hidden_features: int | None = None
    out_features: int | None = None
    num_heads: int = 1
    beta: float | None = None
    update_steps: int = 1

    @nn.compact
    def __call__(self, state):
        if state.ndim != 3:
            raise ValueError(f"expected [B, M, d], got {state.shape}")
        d = state.shape[-1]
        y = self.param("stored", nn.initializers.normal(1.0 / jnp.sqrt(d)), (self.num_patterns, d))
        y = jnp.broadcast_to(y.astype(state.dtype), (state.shape[0], self.num_patterns, d))
        return Hopfield(self.hidden_features, self.out_features, self.num_heads, self.beta, self.update_steps,
                        name="hopfield")(state, y)
