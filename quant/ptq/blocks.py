"""Running a model block by block for post-training quantization, and capturing the inputs of its linear layers.

A :class:`BlockModel` says how to split a model into ``embed -> block_0 -> ... -> block_{L-1} -> head``; the PTQ
methods walk the blocks in order (GPTQ/RSQ feed each block the outputs of the already-quantized previous blocks, as
the reference ``opt_sequential``; AWQ feeds float outputs, as llm-awq ``run_awq``). Inside a block the inputs (and
outputs) of every ``nn.Dense`` are recorded with ``flax.linen.intercept_methods`` — no change to the model code.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax

from jaxmodels.tree import flatten, unflatten

__all__ = ["BlockModel", "AWQGroup", "capture_dense", "get_sub", "set_kernels", "dense_names"]

PyTree = Any


@dataclasses.dataclass(frozen=True)
class AWQGroup:
    """Linears that share one input and one AWQ scale.

    ``prev``: name of the preceding linear into whose output features ``1/s`` is folded (e.g. ``value`` before the
    attention output projection), or ``None`` when it cannot be folded (post-LN residual, GELU): the per-input-channel
    ``1/s`` is then kept as an explicit input scale (llm-awq's ``ScaledActivation``). ``inspect``: ``"block"`` judges
    the scale by the MSE of the whole block's output, ``"linear"`` by the group's own outputs.
    """

    linears: tuple[str, ...]
    prev: str | None = None
    inspect: str = "linear"


@dataclasses.dataclass
class BlockModel:
    """``embed(params, batch) -> (hidden, ctx)``; ``block.apply({"params": p}, hidden, **ctx)``;
    ``head(params, hidden, ctx) -> output``; ``token_weight(ctx) -> [B, T]`` (1 = real token, 0 = padding);
    ``block_paths``: path prefix of each block's parameters in ``flatten(params)``; ``num_heads``: attention heads
    (RSQ's attention-concentration weights); ``attention``: names of the query/key linears; ``awq_groups``.

    ``ctx`` (from ``embed``) is the batch's context (masks, token weights); ``block_kwargs(i, ctx)`` gives the
    keyword arguments of block ``i`` (default: all of ``ctx``, e.g. BERT's padding mask; a causal decoder passes its
    layer index and keeps its token mask out of the block). :meth:`block_ctx` applies it; every ``apply_block`` /
    :func:`capture_dense` call takes the block keyword arguments, not the raw ``ctx``.
    ``causal``: the blocks attend causally (RSQ's attention concentration masks future keys); ``attention_fn(
    records) -> (q, k)`` ``[B, T, heads·d_head]`` from a block's captured linears, when they are not simply the
    outputs of the two ``attention`` linears (fused q|k|v, RoPE, grouped kv heads).
    :func:`quant.ptq.block_models.block_model` builds one from a model."""

    embed: Callable[[PyTree, Any], tuple[jax.Array, dict]]
    block: nn.Module
    block_paths: Sequence[str]
    head: Callable[[PyTree, jax.Array, dict], jax.Array]
    token_weight: Callable[[dict], jax.Array]
    awq_groups: Sequence[AWQGroup] = ()
    num_heads: int = 1
    attention: tuple[str, str] = ("attention/query", "attention/key")
    attention_mask: Callable[[dict], jax.Array] | None = None
    block_kwargs: Callable[[int, dict], dict] | None = None
    causal: bool = False
    attention_fn: Callable[[dict], tuple[jax.Array, jax.Array]] | None = None

    def block_ctx(self, index: int, ctx: dict) -> dict:
        """Keyword arguments of block ``index`` (``block.apply(..., h, **block_ctx(index, ctx))``)."""
        return dict(ctx) if self.block_kwargs is None else dict(self.block_kwargs(index, ctx))

    def forward(self, params: PyTree, batch: Any) -> jax.Array:
        h, ctx = self.embed(params, batch)
        for i, p in enumerate(self.block_paths):
            h = self.apply_block(get_sub(params, p), h, self.block_ctx(i, ctx))
        return self.head(params, h, ctx)

    def apply_block(self, block_params: PyTree, h: jax.Array, ctx: dict) -> jax.Array:
        return _apply(self.block, block_params, h, ctx)


def _apply(block, block_params, h, ctx):
    return _jit_apply(block, block_params, h, dict(ctx))


def _jit_apply_impl(block, block_params, h, ctx_items):
    return block.apply({"params": block_params}, h, **ctx_items)


_jit_apply = jax.jit(_jit_apply_impl, static_argnums=0)


class ByIdentity:
    """``model`` wrapped to hash and compare by identity (a :class:`BlockModel` is an unhashable dataclass): a static
    ``jax.jit`` argument that compiles once per model object without writing anything into the caller's model."""

    __slots__ = ("model",)

    def __init__(self, model):
        self.model = model

    def __hash__(self):
        return id(self.model)

    def __eq__(self, other):
        return isinstance(other, ByIdentity) and other.model is self.model


def get_sub(params: PyTree, prefix: str) -> PyTree:
    """The nested sub-dict of ``params`` at ``prefix`` ("encoder/layer_0")."""
    node = params
    for k in prefix.split("/"):
        if k:
            node = node[k]
    return node


def set_sub(params: PyTree, prefix: str, value: PyTree) -> PyTree:
    """A copy of nested dict ``params`` with the sub-tree at ``prefix`` replaced (inputs are not modified)."""
    keys = [k for k in prefix.split("/") if k]
    if not keys:
        return value

    def rec(node, i):
        new = dict(node)
        new[keys[i]] = value if i == len(keys) - 1 else rec(node[keys[i]], i + 1)
        return new

    return rec(params, 0)


def dense_names(block_params: PyTree) -> list[str]:
    """Names (paths inside the block) of every sub-tree holding a 2-D ``kernel``."""
    return [p[: -len("/kernel")] for p, v in flatten(block_params).items()
            if p.endswith("/kernel") and getattr(v, "ndim", 0) == 2]


def set_kernels(block_params: PyTree, kernels: dict[str, jax.Array], biases: dict[str, jax.Array] | None = None):
    """A copy of ``block_params`` with the kernels (and optionally biases) replaced: ``kernels`` / ``biases`` map a
    layer name of :func:`dense_names` to its new ``kernel`` / ``bias``, cast to the old leaf's dtype; ``ValueError`` if
    a kernel's shape differs. The input is not modified."""
    flat = dict(flatten(block_params))
    for n, k in kernels.items():
        if flat[n + "/kernel"].shape != k.shape:
            raise ValueError(f"kernel {n}: shape {k.shape} != {flat[n + '/kernel'].shape}")
        flat[n + "/kernel"] = k.astype(flat[n + "/kernel"].dtype)
    for n, b in (biases or {}).items():
        flat[n + "/bias"] = b.astype(flat[n + "/bias"].dtype)
    return unflatten(flat, like=block_params)


def _capture_impl(block, block_params, h, ctx_items, input_fn=None):
    records = {}

    def interceptor(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.Dense) and context.method_name == "__call__":
            x = args[0] if input_fn is None else input_fn(args[0])
            out = next_fun(x, *args[1:], **kwargs)
            records["/".join(context.module.path)] = (x, out)
            return out
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        y = block.apply({"params": block_params}, h, **ctx_items)
    return y, records


_capture = jax.jit(_capture_impl, static_argnums=(0, 4))


def capture_dense(model: BlockModel, block_params: PyTree, h: jax.Array, ctx: dict, input_fn=None):
    """Run one block; return ``(output, {dense_name: (input, output)})``. ``input_fn`` (hashable: it is a static
    jit argument), if given, transforms the input of every ``nn.Dense`` first (e.g. activation fake-quant); the
    recorded input is the transformed one."""
    return _capture(model.block, block_params, h, dict(ctx), input_fn)
