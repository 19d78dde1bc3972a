"""Pre-norm Transformer blocks, a layer stack, and the decoder-only LM.

The :class:`Block` takes a mask and an optional context, so one block type
builds a causal decoder, a bidirectional encoder (``causal=False``) and the
decoder of an encoder-decoder (``cross_attention=True``). Its feed-forward is
an :class:`~llm_mp.models.layers.MLP`, or a mixture of experts when
``config.n_experts > 0``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_mp.config import ModelConfig
from llm_mp.formats import state_collections
from llm_mp.models.attention import Attention, RelativePositionBias, segment_mask
from llm_mp.models.layers import (
  MLP,
  Dense,
  Embed,
  LearnedPositions,
  Norm,
  mask_padded_vocab,
  sinusoidal_positions,
)
from llm_mp.precision import Precision, module_path

REMAT_POLICIES = {
  "full": None,  # save nothing: recompute the whole block in the backward pass
  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def make_norm(config: ModelConfig, precision: Precision, name: str) -> Norm:
  return Norm(config.norm, precision, eps=config.norm_eps, use_bias=config.use_bias, name=name)


def make_feed_forward(config: ModelConfig, precision: Precision, name: str) -> nn.Module:
  """The MLP, or a mixture of experts when ``config.n_experts > 0``."""
  if config.n_experts:
    from llm_mp.models.moe import MoE  # pylint: disable=import-outside-toplevel

    return MoE(config, precision, name=name)
  return MLP(config, precision, name=name)


class Block(nn.Module):
  """``x [B, T, d]`` -> ``[B, T, d]``: self-attention, optional cross-attention, MLP.

  Residual additions happen in ``x``'s dtype (the residual-stream dtype).
  """

  config: ModelConfig
  precision: Precision
  causal: bool = True
  cross_attention: bool = False
  decode: bool = False
  deterministic: bool = True

  @nn.compact
  def __call__(self, x, mask=None, positions=None, context=None, context_mask=None, bias=None):
    """``bias``: fp32 ``[B, N, T, S]`` added to the self-attention logits (relative
    positions), or None. Decoding with cross-attention, ``context=None`` reads
    the cross-attention keys/values cached by an earlier call."""
    c, p = self.config, self.precision
    h = make_norm(c, p, "attn_norm")(x)
    h = Attention(c, p, causal=self.causal, decode=self.decode, name="attn")(
      h, mask=mask, positions=positions, deterministic=self.deterministic, bias=bias
    )
    x = x + h.astype(x.dtype)
    if self.cross_attention:
      h = make_norm(c, p, "cross_norm")(x)
      h = Attention(c, p, causal=False, decode=self.decode, cross=True, name="cross_attn")(
        h, context=context, mask=context_mask, deterministic=self.deterministic
      )
      x = x + h.astype(x.dtype)
    h = make_feed_forward(c, p, "mlp")(make_norm(c, p, "mlp_norm")(x), self.deterministic)
    x = x + h.astype(x.dtype)
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class _ScanBlock(nn.Module):
  """Adapts a block to ``nn.scan``'s ``(carry, *xs) -> (carry, ys)`` form."""

  block: type
  kwargs: tuple

  @nn.compact
  def __call__(self, x, *args):
    return self.block(**dict(self.kwargs), name="block")(x, *args), None


class Stack(nn.Module):
  """``config.n_layers`` blocks, optionally rematerialised and/or scanned.

  Unscanned, block ``i`` is ``blocks_i``; scanned, all blocks are one
  ``blocks/block`` whose parameters have a leading ``layers`` axis. With
  ``position="relative"`` the stack owns one T5 relative position bias
  (``relative_bias``, bidirectional unless causal) shared by all its blocks'
  self-attention; decoding, keys sit at the cache slots ``0..max_len-1``.
  """

  config: ModelConfig
  precision: Precision
  causal: bool = True
  cross_attention: bool = False
  decode: bool = False
  deterministic: bool = True

  @nn.compact
  def __call__(self, x, mask=None, positions=None, context=None, context_mask=None):
    c = self.config
    block = Block
    if c.remat != "none":
      block = nn.remat(Block, policy=REMAT_POLICIES[c.remat], prevent_cse=not c.scan_layers)
    kwargs = dict(
      config=c,
      precision=self.precision,
      causal=self.causal,
      cross_attention=self.cross_attention,
      decode=self.decode,
      deterministic=self.deterministic,
    )
    bias = None
    if c.position == "relative":
      k_positions = positions
      if self.decode:
        k_positions = jnp.broadcast_to(jnp.arange(c.max_len), (positions.shape[0], c.max_len))
      bias = RelativePositionBias(
        c, self.precision, bidirectional=not self.causal, name="relative_bias"
      )(positions, k_positions)
    args = (mask, positions, context, context_mask, bias)
    if c.scan_layers:
      scanned = nn.scan(
        _ScanBlock,
        variable_axes={
          "params": 0,
          "cache": 0,
          "intermediates": 0,
          "losses": 0,
          "metrics": 0,
          # the formats' state (fp8 scales): one per block, like the parameters
          **{name: 0 for name in state_collections()},
        },
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast,) * len(args),
        length=c.n_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
      )
      x, _ = scanned(block, tuple(sorted(kwargs.items())), name="blocks")(x, *args)
      return x
    for i in range(c.n_layers):
      x = block(**kwargs, name=f"blocks_{i}")(x, *args)
    return x


def embed_tokens(
  module: nn.Module,
  config: ModelConfig,
  precision: Precision,
  tokens: jax.Array,
  positions: jax.Array,
  deterministic: bool,
  types: jax.Array | None = None,
):
  """Token (+ position) (+ token-type) embedding in the residual-stream dtype, then
  dropout.

  With ``config.n_token_types > 0`` the ``type_embed`` row of each token's
  ``types`` (int[B, T], default 0) is added before dropout, as BERT does.
  Returns ``(x [B, T, d], embed)``; ``embed`` is the :class:`Embed` module
  (its ``attend`` gives tied logits). The residual dtype is the compute dtype
  of the pseudo-path ``residual`` (override it with ``residual=f32``).
  """
  c = config
  embed = Embed(c.padded_vocab, c.d_model, precision, c.init_std, name="embed")
  x = embed(tokens)
  if c.position == "learned":
    x = x + LearnedPositions(c.max_len, c.d_model, precision, name="pos_embed")(positions)
  elif c.position == "sinusoidal":
    x = x + sinusoidal_positions(positions, c.d_model).astype(x.dtype)
  if c.n_token_types:
    types = jnp.zeros_like(tokens) if types is None else types
    type_embed = Embed(c.n_token_types, c.d_model, precision, c.init_std, name="type_embed")
    x = x + type_embed(types).astype(x.dtype)
  residual = precision.for_path(_child(module, "residual"))
  x = nn.Dropout(c.dropout)(x.astype(residual.compute_dtype), deterministic=deterministic)
  return nn.with_logical_constraint(x, ("batch", "length", "embed")), embed


def _child(module: nn.Module, name: str) -> str:
  path = module_path(module)
  return f"{path}/{name}" if path else name


def check_length(config: ModelConfig, tokens: jax.Array) -> None:
  if tokens.shape[-1] > config.max_len:
    raise ValueError(
      f"sequence length {tokens.shape[-1]} is longer than model.max_len={config.max_len}"
    )


class TransformerLM(nn.Module):
  """Decoder-only language model (GPT-2 or LLaMA style, by config).

  ``__call__(tokens int[B, T], segment_ids int[B, T] | None,
  positions int[B, T] | None, deterministic)`` -> logits ``[B, T, vocab]`` in
  the ``lm_head`` policy's output dtype (fp32 by default). ``segment_ids``
  (0 = padding) keep packed documents from attending to each other;
  ``positions`` default to ``0..T-1``. With ``decode=True`` the model runs
  one chunk at a time against its KV cache and ``positions`` are required.
  """

  config: ModelConfig
  precision: Precision
  decode: bool = False

  @nn.compact
  def __call__(self, tokens, segment_ids=None, positions=None, deterministic=True):
    c = self.config
    check_length(c, tokens)
    if positions is None:
      if self.decode:
        raise ValueError("decode=True needs explicit positions (cache index + arange)")
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    x, embed = embed_tokens(self, c, self.precision, tokens, positions, deterministic)
    mask = None if segment_ids is None or self.decode else segment_mask(segment_ids, segment_ids)
    x = Stack(
      c,
      self.precision,
      causal=True,
      decode=self.decode,
      deterministic=deterministic,
      name="decoder",
    )(x, mask, positions)
    x = make_norm(c, self.precision, "final_norm")(x)
    if c.tie_embeddings:
      logits = embed.attend(x, self.precision.for_path(_child(self, "lm_head")))
    else:
      logits = Dense(
        c.padded_vocab,
        ("embed", "vocab"),
        self.precision,
        use_bias=False,
        init_std=c.init_std,
        name="lm_head",
      )(x)
    return mask_padded_vocab(logits, c.vocab_size)
