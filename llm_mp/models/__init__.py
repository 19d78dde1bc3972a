"""Transformer building blocks and model families."""

from llm_mp.models.attention import Attention, dot_product_attention, segment_mask
from llm_mp.models.encoder import TransformerEncoder, pool
from llm_mp.models.layers import MLP, Dense, Embed, LearnedPositions, Norm, apply_rope
from llm_mp.models.moe import MoE
from llm_mp.models.transformer import Block, Stack, TransformerLM

__all__ = [
    "Attention", "Block", "Dense", "Embed", "LearnedPositions", "MLP", "MoE", "Norm", "Stack",
    "TransformerEncoder", "TransformerLM", "apply_rope", "dot_product_attention", "pool",
    "segment_mask",
]
