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
]
