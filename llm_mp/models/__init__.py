"""Transformer building blocks and the model families, built by name.

:data:`FAMILIES` maps ``model.family`` to a :class:`Family`; :func:`build_model`
is the one place a model is made from a config. Adding a family is one entry.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_mp.config import ModelConfig
from llm_mp.models.attention import (
  Attention,
  RelativePositionBias,
  dot_product_attention,
  relative_position_bucket,
  segment_mask,
)
from llm_mp.models.encoder import HEAD_MODULES, HEAD_PARAMS, TransformerEncoder, pool
from llm_mp.models.layers import MLP, Dense, Embed, LearnedPositions, Norm, apply_rope
from llm_mp.models.moe import MoE
from llm_mp.models.seq2seq import EncoderDecoder
from llm_mp.models.transformer import Block, Stack, TransformerLM
from llm_mp.precision import Precision

# HEAD_PARAMS: the top-level modules of a task head rather than the shared
# backbone: a fine-tuning run loads everything else from its source run, and
# ``train.backbone_lr_scale`` applies to everything else.


@dataclasses.dataclass(frozen=True)
class Family:
  """How to build one model family.

  Attributes:
    build: ``(config, precision, head, decode) -> flax module``.
    heads: the heads it supports ("lm", "classify", ...).
    example_inputs: ``seq_len -> args`` for ``model.init`` (shapes only matter).
    stacks: ``config -> {module path prefix: layers}``: its stacks of blocks
      (where ``precision.formats`` leaves the first and last block alone).
    reads_source: whether it maps a source text to a target (an encoder-decoder:
      ``llm-mp generate --source``) rather than continuing a prompt.
  """

  build: Callable[[ModelConfig, Precision, str, bool], nn.Module]
  heads: tuple[str, ...]
  example_inputs: Callable[[int], tuple]
  stacks: Callable[[ModelConfig], dict[str, int]] = lambda c: {"*": c.n_layers}
  reads_source: bool = False


def _tokens(seq_len: int) -> tuple:
  return (jnp.zeros((1, seq_len), jnp.int32),)


def _source_and_target(seq_len: int) -> tuple:
  tokens = jnp.zeros((1, seq_len), jnp.int32)
  return (tokens, None, tokens)  # inputs, segment_ids, decoder_inputs


def _decoder(config: ModelConfig, precision: Precision, head: str, decode: bool) -> nn.Module:
  return TransformerLM(config, precision, decode=decode)


def _encoder(config: ModelConfig, precision: Precision, head: str, decode: bool) -> nn.Module:
  if decode:
    raise ValueError("model.family='encoder' has no decoding mode (it is bidirectional)")
  return TransformerEncoder(config, precision, head=head)


def _encoder_decoder(
  config: ModelConfig, precision: Precision, head: str, decode: bool
) -> nn.Module:
  return EncoderDecoder(config, precision, decode=decode)


FAMILIES: dict[str, Family] = {
  "decoder": Family(_decoder, heads=("lm",), example_inputs=_tokens),
  "encoder": Family(_encoder, heads=("lm", "classify", "span", "hidden"), example_inputs=_tokens),
  "encoder_decoder": Family(
    _encoder_decoder,
    heads=("lm",),
    example_inputs=_source_and_target,
    stacks=lambda c: {"encoder/*": c.n_layers, "decoder/*": c.decoder_layers},
    reads_source=True,
  ),
}


def build_model(
  config: ModelConfig, precision: Precision, head: str = "lm", decode: bool = False
) -> nn.Module:
  """The model of ``config.family`` with ``head`` ("lm" or "classify").

  Raises:
    ValueError: the family does not have that head.
  """
  family = FAMILIES[config.family]
  if head not in family.heads:
    raise ValueError(
      f"model.family={config.family!r} has no {head!r} head; it has {list(family.heads)}"
    )
  return family.build(config, precision, head, decode)


def resolve_model_choices(
  model: ModelConfig, precision: Precision, backend: str | None = None
) -> ModelConfig:
  """``model`` with its "auto" implementation choices made for ``backend``
  (default: ``jax.default_backend()``).

  ``model.attention_impl="auto"`` becomes "cudnn" (flash attention, no
  ``T x T`` scores in memory) on a GPU when the compute dtype is bf16 or fp16,
  the dtypes that kernel takes, and "xla" otherwise.
  """
  if model.attention_impl != "auto":
    return model
  backend = backend or jax.default_backend()
  half = jnp.dtype(precision.compute_dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  impl = "cudnn" if backend == "gpu" and half else "xla"
  return dataclasses.replace(model, attention_impl=impl)


def build_resolved_model(
  model: ModelConfig, precision: Precision, head: str = "lm", decode: bool = False
) -> nn.Module:
  """The flax module of ``model`` (by ``model.family``) under ``precision``, its
  "auto" choices resolved for this backend (:func:`resolve_model_choices`).

  For callers that hold a model config and a policy but no run config
  (generation, numerics); :func:`llm_mp.builder.build_recipe` builds a whole run's.
  """
  return build_model(resolve_model_choices(model, precision), precision, head=head, decode=decode)


__all__ = [
  "Attention",
  "Block",
  "Dense",
  "Embed",
  "EncoderDecoder",
  "FAMILIES",
  "Family",
  "HEAD_MODULES",
  "HEAD_PARAMS",
  "LearnedPositions",
  "MLP",
  "MoE",
  "Norm",
  "RelativePositionBias",
  "Stack",
  "TransformerEncoder",
  "TransformerLM",
  "apply_rope",
  "build_model",
  "build_resolved_model",
  "dot_product_attention",
  "pool",
  "relative_position_bucket",
  "resolve_model_choices",
  "segment_mask",
]
