"""The bidirectional (BERT-style) encoder: masked-LM, classification and span heads.

The backbone is the decoder's: the same embeddings, :class:`Stack` of
pre-norm blocks (here with ``causal=False``) and final norm. Padding and
packed documents are masked by ``segment_ids`` (0 = padding, never attended
to). Three heads sit on top:

* ``"lm"``: masked-LM logits ``[B, T, vocab]``, tied to the token embedding
  or a ``lm_head`` Dense, exactly as :class:`TransformerLM`'s head;
* ``"classify"``: a pooled representation (first token or mean over real
  tokens) through BERT's ``pooler`` (Dense + tanh) and a ``classifier``
  Dense to ``[B, n_classes]`` logits, fp32 under every policy;
* ``"span"``: BERT's extractive question-answering head, a ``span_head`` Dense
  from each token's hidden state to its start and end logits ``[B, T, 2]``,
  fp32 under every policy (the task masks them to the context tokens).

Parameters named ``lm_head``, ``pooler``, ``classifier`` and ``span_head`` are the heads;
everything else (``embed``, ``pos_embed``, ``encoder``, ``final_norm``) is the
backbone both heads share, so an MLM-pretrained backbone loads into a
classifier by name. Unlike BERT (post-norm) the blocks are pre-norm, as in
the rest of llm_mp, and the MLM head has no extra transform layer.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_mp.config import ModelConfig
from llm_mp.models.attention import segment_mask
from llm_mp.models.layers import Dense, mask_padded_vocab
from llm_mp.models.transformer import Stack, _child, check_length, embed_tokens, make_norm
from llm_mp.precision import Precision

HEADS = ("lm", "classify", "span", "hidden")
# The top-level modules of each head (a decoder's untied output layer is "lm_head" too).
HEAD_MODULES = {"lm": ("lm_head",), "classify": ("pooler", "classifier"), "span": ("span_head",)}
# Top-level names that are not backbone.
HEAD_PARAMS = ("lm_head", "pooler", "classifier", "span_head")


def pool(hidden: jax.Array, segment_ids: jax.Array | None, kind: str) -> jax.Array:
  """One vector per row from the encoder's final hidden states.

  Args:
    hidden: ``[B, T, d]`` in any float dtype.
    segment_ids: int ``[B, T]`` (0 = padding) or None (every token is real).
    kind: ``"first"`` (the first position, BERT's [CLS] slot) or ``"mean"``
      (mean over positions with ``segment_ids > 0``).

  Returns:
    ``[B, d]`` float32 (float64 for a float64 input). The mean sums in fp32: a bf16 running sum over
    hundreds of positions would lose the low bits of every term.
  """
  acc = jnp.promote_types(hidden.dtype, jnp.float32)  # fp32, or fp64 for references
  if kind == "first":
    return hidden[:, 0].astype(acc)
  if kind != "mean":
    raise ValueError(f"model.pool={kind!r} is not one of ['first', 'mean']")
  h = hidden.astype(acc)
  if segment_ids is None:
    return h.mean(axis=1)
  real = (segment_ids > 0).astype(acc)[..., None]  # (B, T, 1)
  # An all-padding row pools to zeros rather than 0/0.
  return (h * real).sum(axis=1) / jnp.maximum(real.sum(axis=1), 1.0)


class TransformerEncoder(nn.Module):
  """Bidirectional Transformer encoder with a masked-LM or classification head.

  ``__call__(tokens int[B, T], segment_ids int[B, T] | None,
  positions int[B, T] | None, types int[B, T] | None, deterministic)``
  returns, by ``head``:

  * ``"lm"``: logits ``[B, T, vocab]`` in the ``lm_head`` policy's output
    dtype (fp32 by default);
  * ``"classify"``: logits ``[B, config.n_classes]`` in fp32 (the
    ``classifier`` override), from ``pool(hidden, segment_ids, config.pool)``;
    the pooled vector is also sown as ``intermediates/pooled``;
  * ``"span"``: start and end logits ``[B, T, 2]`` (``[..., 0]`` start,
    ``[..., 1]`` end) in fp32 (the ``span_head`` override), for every token:
    the task masks out the question and padding;
  * ``"hidden"``: the backbone's final hidden states ``[B, T, d]`` in the
    residual-stream dtype (no head parameters).

  ``segment_ids`` (0 = padding) keep padding and packed documents out of
  every real token's attention; ``positions`` default to ``0..T-1``. With
  ``config.n_token_types > 0``, the ``type_embed`` row of each token's ``types``
  (default 0) is added to its token embedding (BERT's token types). With
  ``deterministic=False``, dropout (``config.dropout``) draws from the
  ``"dropout"`` rng collection.
  """

  config: ModelConfig
  precision: Precision
  head: str = "lm"

  @nn.compact
  def __call__(self, tokens, segment_ids=None, positions=None, types=None, deterministic=True):
    c, p = self.config, self.precision
    if self.head not in HEADS:
      raise ValueError(f"TransformerEncoder head={self.head!r} is not one of {list(HEADS)}")
    check_length(c, tokens)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    x, embed = embed_tokens(self, c, p, tokens, positions, deterministic, types)
    mask = None if segment_ids is None else segment_mask(segment_ids, segment_ids)
    x = Stack(c, p, causal=False, deterministic=deterministic, name="encoder")(x, mask, positions)
    x = make_norm(c, p, "final_norm")(x)  # (B, T, d)
    if self.head == "hidden":
      return x
    if self.head == "lm":
      if c.tie_embeddings:
        logits = embed.attend(x, p.for_path(_child(self, "lm_head")))
      else:
        logits = Dense(
          c.padded_vocab, ("embed", "vocab"), p, use_bias=False, init_std=c.init_std, name="lm_head"
        )(x)
      return mask_padded_vocab(logits, c.vocab_size)
    if self.head == "span":
      return Dense(2, ("embed", None), p, use_bias=True, init_std=c.init_std, name="span_head")(
        x
      )  # (B, T, 2), fp32 by the "span_head" override
    pooled = pool(x, segment_ids, c.pool)  # (B, d) fp32
    self.sow("intermediates", "pooled", pooled)
    # Head kernels are small ([d, d], [d, n_classes]): only their input axis is sharded.
    h = Dense(
      c.d_model,
      ("embed", None),
      p,
      use_bias=True,
      init_std=c.init_std,
      activation=jnp.tanh,
      name="pooler",
    )(pooled)
    h = nn.Dropout(c.dropout)(h, deterministic=deterministic)
    return Dense(
      c.n_classes, (None, None), p, use_bias=True, init_std=c.init_std, name="classifier"
    )(h)  # (B, n_classes), fp32 by the "classifier" override
