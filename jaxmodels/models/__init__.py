"""Models as Flax linen modules (pure ``init``/``apply``), each with default sharding rules."""

from jaxmodels.models.bert import (
    BERT_RULES_DP,
    BERT_RULES_TP,
    BertConfig,
    BertEncoder,
    BertTokenizer,
    SentenceEmbedder,
    load_bert_safetensors,
    load_minilm,
)
from jaxmodels.models.generate import generate
from jaxmodels.models.gpt2 import GPT2, GPT2_RULES_DP, GPT2_RULES_FSDP, GPT2_RULES_TP, GPT2Block, GPT2Config
from jaxmodels.models.llama import LLAMA_RULES_DP, LLAMA_RULES_FSDP, LLAMA_RULES_TP, Llama, LlamaBlock, LlamaConfig
from jaxmodels.models.pretrained import load_pretrained, save_pretrained
from jaxmodels.models.gpt import GPT, GPT_RULES_DP, GPT_RULES_TP, GPTBlock, hidden_norms, stack_layers, unstack_layers
from jaxmodels.models.mlp import MLP, MLP_RULES_DP, MLP_RULES_TP
from jaxmodels.models.resnet import RESNET_RULES_DP, RESNET_RULES_TP, ResNet, ResNet20, ResNetBlock, layers_to_blocks
from jaxmodels.models.transformer import FeedForward, MultiHeadAttention, make_norm
from jaxmodels.models.vit import VIT_CONFIGS, VIT_RULES_DP, VIT_RULES_TP, ViT, ViTBlock

__all__ = [
    "MLP", "MLP_RULES_DP", "MLP_RULES_TP",
    "FeedForward", "MultiHeadAttention", "make_norm",
    "BertConfig", "BertEncoder", "BertTokenizer", "SentenceEmbedder", "load_bert_safetensors", "load_minilm",
    "BERT_RULES_DP", "BERT_RULES_TP",
    "GPT", "GPTBlock", "GPT_RULES_DP", "GPT_RULES_TP", "hidden_norms", "stack_layers", "unstack_layers",
    "ResNet", "ResNet20", "ResNetBlock", "layers_to_blocks", "RESNET_RULES_DP", "RESNET_RULES_TP",
    "ViT", "ViTBlock", "VIT_CONFIGS", "VIT_RULES_DP", "VIT_RULES_TP",
    "Llama", "LlamaBlock", "LlamaConfig", "LLAMA_RULES_DP", "LLAMA_RULES_TP", "LLAMA_RULES_FSDP",
    "GPT2", "GPT2Block", "GPT2Config", "GPT2_RULES_DP", "GPT2_RULES_TP", "GPT2_RULES_FSDP",
    "load_pretrained", "save_pretrained", "generate",
]
