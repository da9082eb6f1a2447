"""Models as Flax linen modules (pure ``init``/``apply``), each with default sharding rules."""

from jaxmodels.models.mlp import MLP, MLP_RULES_DP, MLP_RULES_TP

__all__ = ["MLP", "MLP_RULES_DP", "MLP_RULES_TP"]
