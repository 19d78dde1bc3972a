"""The encoder-decoder Transformer (Vaswani et al. / T5 style), for text-to-text tasks.

Built from the blocks the other families use: the encoder is a
:class:`~llm_mp.models.transformer.Stack` with ``causal=False``, the decoder a
causal ``Stack`` with cross-attention to the encoder's output. Layer counts
are ``model.n_layers`` (encoder) and ``model.n_decoder_layers`` (decoder);
``model.share_embeddings`` chooses one token table for source and target (T5,
and Vaswani et al. with a joint BPE) or two. Positions are any of the
position kinds; with ``position="relative"`` each stack owns a T5 relative
position bias for its self-attention (cross-attention has none, as in T5).

Parameter layout: ``embed`` (the target table, or the shared one),
``source_embed`` (only when not shared), ``encoder/{pos_embed, stack,
final_norm}``, ``decoder/{pos_embed, stack, final_norm}`` and ``lm_head``
(only when ``tie_embeddings=False``; tied logits use ``embed``).

Segment ids mark padding (0) on both sides: a padding source token is never
attended to, and the loss ignores padding targets. Equal non-zero ids pair
the target segment ``k`` with the source segment ``k`` (packed examples).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_mp.config import ModelConfig
from llm_mp.models.attention import segment_mask
from llm_mp.models.layers import (
  Dense,
  Embed,
  LearnedPositions,
  mask_padded_vocab,
  sinusoidal_positions,
)
from llm_mp.models.transformer import Stack, _child, check_length, make_norm
from llm_mp.precision import Precision


def _default_positions(tokens: jax.Array) -> jax.Array:
  return jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)


class _Side(nn.Module):
  """One side (encoder or decoder): embeddings, a :class:`Stack` and the final norm.

  ``__call__(tokens int[B, L], positions int[B, L], mask, context, context_mask,
  deterministic)`` -> hidden ``[B, L, d]`` after the final norm.
  """

  config: ModelConfig
  precision: Precision
  embed: nn.Module
  causal: bool
  cross_attention: bool = False
  decode: bool = False

  @nn.compact
  def __call__(
    self, tokens, positions, mask=None, context=None, context_mask=None, deterministic=True
  ):
    c, p = self.config, self.precision
    x = self.embed(tokens)
    if c.position == "learned":
      x = x + LearnedPositions(c.max_len, c.d_model, p, name="pos_embed")(positions)
    elif c.position == "sinusoidal":
      x = x + sinusoidal_positions(positions, c.d_model).astype(x.dtype)
    residual = p.for_path(_child(self, "residual"))
    x = nn.Dropout(c.dropout)(x.astype(residual.compute_dtype), deterministic=deterministic)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    x = Stack(
      c,
      p,
      causal=self.causal,
      cross_attention=self.cross_attention,
      decode=self.decode,
      deterministic=deterministic,
      name="stack",
    )(x, mask, positions, context, context_mask)
    return make_norm(c, p, "final_norm")(x)


class EncoderDecoder(nn.Module):
  """Encoder-decoder Transformer with an LM head on the decoder.

  ``__call__(inputs int[B, S], segment_ids int[B, S] | None, decoder_inputs
  int[B, T], decoder_segment_ids int[B, T] | None, positions, decoder_positions,
  deterministic)`` -> logits ``[B, T, vocab]`` in the ``lm_head`` policy's
  output dtype (fp32 by default). Teacher forcing: ``decoder_inputs`` are the
  targets shifted right behind a BOS token.

  :meth:`encode` and :meth:`decoder_logits` run the two halves (the method is
  not called ``decode``: that is the decoding-mode flag, as for
  :class:`~llm_mp.models.TransformerLM`). With ``decode=True`` the decoder
  runs one chunk at a time against its KV cache (``llm_mp.generate``):
  :meth:`decoder_logits` with ``encoded`` projects and caches the
  cross-attention keys/values, later calls pass ``encoded=None`` and reuse
  them; ``positions`` are then required.
  """

  config: ModelConfig
  precision: Precision
  decode: bool = False

  def setup(self):
    c, p = self.config, self.precision
    make_embed = lambda name: Embed(c.padded_vocab, c.d_model, p, c.init_std, name=name)
    self.embed = make_embed("embed")
    source_embed = self.embed if c.share_embeddings else make_embed("source_embed")
    self.encoder = _Side(c, p, source_embed, causal=False, name="encoder")
    decoder_config = dataclasses.replace(c, n_layers=c.decoder_layers)
    self.decoder = _Side(
      decoder_config,
      p,
      self.embed,
      causal=True,
      cross_attention=True,
      decode=self.decode,
      name="decoder",
    )
    if not c.tie_embeddings:
      self.lm_head = Dense(
        c.padded_vocab, ("embed", "vocab"), p, use_bias=False, init_std=c.init_std, name="lm_head"
      )

  def encode(self, src_tokens, src_segment_ids=None, positions=None, deterministic=True):
    """Source ``int[B, S]`` (segment ids 0 = padding) -> hidden ``[B, S, d]``
    in the residual-stream dtype (after the encoder's final norm)."""
    check_length(self.config, src_tokens)
    if positions is None:
      positions = _default_positions(src_tokens)
    mask = None if src_segment_ids is None else segment_mask(src_segment_ids, src_segment_ids)
    return self.encoder(src_tokens, positions, mask, deterministic=deterministic)

  def decoder_logits(
    self,
    tgt_tokens,
    encoded,
    src_segment_ids=None,
    tgt_segment_ids=None,
    positions=None,
    deterministic=True,
  ):
    """Decoder logits ``[B, T, vocab]`` (fp32 by default) for target ``int[B, T]``.

    Args:
      tgt_tokens: decoder inputs (BOS + targets shifted right).
      encoded: :meth:`encode`'s ``[B, S, d]``; None only when decoding with a
        filled cross-attention cache.
      src_segment_ids: ``int[B, S]`` (0 = padding: never attended to), or None.
      tgt_segment_ids: ``int[B, T]`` or None; ignored when decoding (the cache
        mask hides empty slots).
      positions: ``int[B, T]``; default ``0..T-1``; required when decoding.
    """
    c = self.config
    check_length(c, tgt_tokens)
    if positions is None:
      if self.decode:
        raise ValueError("decode=True needs explicit positions (cache index + arange)")
      positions = _default_positions(tgt_tokens)
    mask, context_mask = None, None
    if tgt_segment_ids is not None and not self.decode:
      mask = segment_mask(tgt_segment_ids, tgt_segment_ids)
      if src_segment_ids is not None:
        context_mask = segment_mask(tgt_segment_ids, src_segment_ids)
    if context_mask is None and src_segment_ids is not None:
      context_mask = (src_segment_ids > 0)[:, None, None, :]  # (B, 1, 1, S)
    x = self.decoder(
      tgt_tokens, positions, mask, encoded, context_mask, deterministic=deterministic
    )
    if c.tie_embeddings:
      logits = self.embed.attend(x, self.precision.for_path(_child(self, "lm_head")))
    else:
      logits = self.lm_head(x)
    return mask_padded_vocab(logits, c.vocab_size)

  def __call__(
    self,
    inputs,
    segment_ids=None,
    decoder_inputs=None,
    decoder_segment_ids=None,
    positions=None,
    decoder_positions=None,
    deterministic=True,
  ):
    """Teacher-forced logits ``[B, T, vocab]``; see the class docstring."""
    if decoder_inputs is None:
      raise ValueError("EncoderDecoder needs decoder_inputs (BOS + shifted targets)")
    encoded = self.encode(inputs, segment_ids, positions, deterministic=deterministic)
    return self.decoder_logits(
      decoder_inputs,
      encoded,
      segment_ids,
      decoder_segment_ids,
      decoder_positions,
      deterministic=deterministic,
    )
