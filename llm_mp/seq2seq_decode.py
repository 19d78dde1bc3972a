"""Decoding an encoder-decoder: greedy, sampling and beam search, batched and jitted.

:func:`generate_seq2seq` runs the encoder once, repeats its output for the
beams, and primes the decoder with BOS: that first call projects the encoder
output to every layer's cross-attention keys/values and caches them (later
steps pass no context and read the cache). Each further token costs one
single-token decoder pass against the self-attention KV cache. The whole
search is one ``lax.while_loop`` inside one ``jax.jit``.

The searches themselves (:func:`sample_search`, :func:`beam_search`) take a
``step_fn(tokens int[R], position, state) -> (logits [R, V], state)``, so they
are tested on hand-built models whose best sequence is known.

Beam search follows GNMT / T5: a finished hypothesis of ``L`` tokens (its EOS
included) scores ``log p / ((5 + L) / 6) ** length_penalty``; each step keeps
the ``beam_size`` best unfinished continuations and the ``beam_size`` best
finished hypotheses; a hypothesis reaching ``max_new_tokens`` without EOS is
finished there. The loop stops early once, for every example, the beam of
finished hypotheses is full and no live beam can still beat its worst one.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from llm_mp.config import ModelConfig
from llm_mp.generate import sample_logits
from llm_mp.models import build_model
from llm_mp.precision import Precision

# Finite "minus infinity" for scores: -inf - (-inf) would give NaN in comparisons.
NEG = -1.0e9
StepFn = Callable[[jax.Array, Any, Any], tuple[jax.Array, Any]]


def length_penalty_factor(length: Any, alpha: float) -> jax.Array:
  """GNMT's ``((5 + length) / 6) ** alpha`` (fp32); scores are ``log p`` over it."""
  return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def _write(seqs: jax.Array, i: jax.Array, tokens: jax.Array) -> jax.Array:
  """``seqs[..., i] = tokens`` for a traced ``i``."""
  return jnp.where(jnp.arange(seqs.shape[-1]) == i, tokens[..., None], seqs)


def sample_search(
  step_fn: StepFn,
  state: Any,
  logits: jax.Array,
  *,
  max_new_tokens: int,
  eos_id: int,
  pad_id: int,
  rng: jax.Array,
  temperature: float = 0.0,
  top_k: int | None = None,
  top_p: float | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Greedy (``temperature=0``) or sampled decoding, one token per row per step.

  Args:
    step_fn: ``(tokens int[B], position, state) -> (logits [B, V], state)``:
      feeds token ``i - 1`` at decoder position ``i`` (BOS sat at 0).
    state: what ``step_fn`` threads (the decoder cache).
    logits: ``[B, V]`` for the first token (from the BOS step).
    max_new_tokens: ``N``, the most tokens written per row.
    eos_id, pad_id: after a row writes ``eos_id`` it writes only ``pad_id``.
    rng: step ``i`` samples with ``fold_in(rng, i)``.
    temperature, top_k, top_p: as :func:`llm_mp.generate.sample_logits`.

  Returns:
    ``(tokens int32[B, N], steps int32[])``; the loop stops once every row is done.
  """
  b = logits.shape[0]
  sample = functools.partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p)

  def emit(i, logits, out, done):
    token = jnp.where(done, pad_id, sample(logits, jax.random.fold_in(rng, i)))
    return token, _write(out, i, token), done | (token == eos_id)

  out = jnp.full((b, max_new_tokens), pad_id, jnp.int32)
  token, out, done = emit(0, logits, out, jnp.zeros((b,), bool))

  def cond(carry):
    i, _, _, _, done = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    i, token, state, out, done = carry
    logits, state = step_fn(token, i, state)
    token, out, done = emit(i, logits, out, done)
    return i + 1, token, state, out, done

  i, _, _, out, _ = jax.lax.while_loop(cond, body, (jnp.int32(1), token, state, out, done))
  return out, i


def beam_search(
  step_fn: StepFn,
  reorder_fn: Callable[[Any, jax.Array], Any],
  state: Any,
  logits: jax.Array,
  *,
  beam_size: int,
  max_new_tokens: int,
  eos_id: int,
  pad_id: int,
  length_penalty: float = 0.6,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Beam search with GNMT's length penalty (see the module docstring).

  Args:
    step_fn: ``(tokens int[B*W], position, state) -> (logits [B*W, V], state)``;
      row ``b * W + w`` is beam ``w`` of example ``b``.
    reorder_fn: ``(state, rows int[B*W]) -> state`` whose row ``r`` is the
      old row ``rows[r]`` (beams follow their parents).
    state: what ``step_fn`` threads.
    logits: ``[B*W, V]`` for the first token (all beams of an example equal).
    beam_size: ``W``.
    max_new_tokens: ``N``.
    eos_id, pad_id: a hypothesis ends at ``eos_id``, then ``pad_id`` to ``N``.
    length_penalty: ``alpha``; 0 ranks by ``log p`` alone.

  Returns:
    ``(tokens int32[B, N], scores float32[B], steps int32[])``: the best
    hypothesis of each example, its score, and the tokens positions searched.
  """
  w = beam_size
  v = logits.shape[-1]
  b = logits.shape[0] // w
  n = max_new_tokens
  top = lambda x, k: jax.lax.top_k(x, k)
  pick = lambda x, idx: jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)

  def select(i, logits, live_seqs, live_logp, fin_seqs, fin_scores, fin_flags):
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1).reshape(b, w, v)
    cand = (live_logp[..., None] + logp).reshape(b, w * v)
    # 2W candidates hold at least W that are not EOS (each parent has one EOS).
    cand_logp, cand_idx = top(cand, 2 * w)  # (B, 2W)
    parent, token = cand_idx // v, cand_idx % v
    seqs = _write(pick(live_seqs, parent), i, token)  # (B, 2W, N)
    is_eos = token == eos_id
    new_logp, keep = top(jnp.where(is_eos, NEG, cand_logp), w)  # (B, W)
    new_seqs, new_parent, new_token = pick(seqs, keep), pick(parent, keep), pick(token, keep)
    # Finished now: EOS candidates, and at the last position every live beam.
    eos_ok = is_eos & (cand_logp > NEG / 2)
    last = i == n - 1
    all_seqs = jnp.concatenate([fin_seqs, seqs, new_seqs], axis=1)
    all_scores = jnp.concatenate(
      [
        fin_scores,
        jnp.where(eos_ok, cand_logp / length_penalty_factor(i + 1, length_penalty), NEG),
        jnp.where(last, new_logp / length_penalty_factor(n, length_penalty), NEG),
      ],
      axis=1,
    )
    all_flags = jnp.concatenate([fin_flags, eos_ok, last & (new_logp > NEG / 2)], axis=1)
    fin_scores, keep = top(jnp.where(all_flags, all_scores, 2 * NEG), w)
    fin_seqs, fin_flags = pick(all_seqs, keep), pick(all_flags, keep)
    rows = (jnp.arange(b)[:, None] * w + new_parent).reshape(-1)
    return new_token, rows, new_seqs, new_logp, fin_seqs, fin_scores, fin_flags

  live_seqs = jnp.full((b, w, n), pad_id, jnp.int32)
  # Only beam 0 is live at first: the W copies of BOS would give W equal beams.
  live_logp = jnp.where(jnp.arange(w) == 0, 0.0, NEG) * jnp.ones((b, 1), jnp.float32)
  fin = (
    jnp.full((b, w, n), pad_id, jnp.int32),
    jnp.full((b, w), 2 * NEG, jnp.float32),
    jnp.zeros((b, w), bool),
  )
  token, rows, *beams = select(0, logits, live_seqs, live_logp, *fin)
  state = reorder_fn(state, rows)

  def cond(carry):
    i, _, _, _, live_logp, _, fin_scores, fin_flags = carry
    best_live = live_logp[:, 0] / jnp.maximum(
      length_penalty_factor(i + 1, length_penalty), length_penalty_factor(n, length_penalty)
    )
    settled = jnp.all(fin_flags, axis=1) & (fin_scores[:, -1] >= best_live)
    return (i < n) & ~jnp.all(settled)

  def body(carry):
    i, token, state, *beams = carry
    logits, state = step_fn(token.reshape(-1), i, state)
    token, rows, *beams = select(i, logits, *beams)
    return (i + 1, token, reorder_fn(state, rows), *beams)

  i, _, _, _, _, fin_seqs, fin_scores, _ = jax.lax.while_loop(
    cond, body, (jnp.int32(1), token, state, *beams)
  )
  return fin_seqs[:, 0], fin_scores[:, 0], i


def init_decoder_cache(model: Any, batch_size: int, src_len: int) -> Any:
  """An empty decoding cache of an :class:`~llm_mp.models.EncoderDecoder` built
  with ``decode=True``: per decoder layer the self-attention
  ``cached_key``/``cached_value`` ``[batch_size, max_len, kv_heads, head_dim]``
  and ``index`` 0, and the cross-attention ``context_key``/``context_value``
  ``[batch_size, src_len, kv_heads, head_dim]`` (zeros until the first step
  fills them). Only shapes are traced."""
  c = model.config
  src = jnp.zeros((batch_size, src_len), jnp.int32)
  tgt = jnp.zeros((batch_size, c.max_len), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(c.max_len), tgt.shape)
  shapes = jax.eval_shape(
    lambda: model.init(jax.random.key(0), src, None, tgt, decoder_positions=positions)["cache"]
  )
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def reorder_cache(cache: Any, rows: jax.Array, scan_layers: bool) -> Any:
  """The self-attention KV cache with batch row ``r`` taken from row ``rows[r]``.

  The cross-attention keys/values are left as they are: beams only move
  within their example, whose rows share one context.
  """
  axis = 1 if scan_layers else 0  # a scanned stack stacks layers first

  def take(path, x):
    name = getattr(path[-1], "key", None)
    return jnp.take(x, rows, axis=axis) if name in ("cached_key", "cached_value") else x

  return jax.tree_util.tree_map_with_path(take, cache)


def generate_seq2seq(
  config: ModelConfig,
  precision: Precision,
  params: Any,
  src_tokens: jax.Array,
  src_segment_ids: jax.Array | None = None,
  *,
  max_new_tokens: int,
  bos_id: int,
  eos_id: int,
  pad_id: int | None = None,
  beam_size: int = 1,
  length_penalty: float = 0.6,
  temperature: float = 0.0,
  top_k: int | None = None,
  top_p: float | None = None,
  rng: jax.Array | None = None,
) -> jax.Array:
  """Target tokens for each source row of an encoder-decoder.

  Args:
    config: the model's architecture (``family="encoder_decoder"``).
    precision: the policy the model runs in (the caches take the key/value
      projections' dtype).
    params: the :class:`~llm_mp.models.EncoderDecoder` parameters.
    src_tokens: int ``[B, S]``; ``src_segment_ids`` int ``[B, S]`` (0 =
      padding, never attended to) or None (every token real).
    max_new_tokens: ``N``, at most ``model.max_len`` (the decoder cache length).
    bos_id: the decoder's first input; eos_id: ends a row; pad_id: fills a row
      after its EOS (default ``eos_id``).
    beam_size: 1 = greedy or sampling; ``W > 1`` = beam search (``temperature``
      must be 0). Beam size 1 with ``length_penalty=0`` is greedy decoding.
    length_penalty: beam search's ``alpha`` (GNMT / T5; 0.6 is their default).
    temperature, top_k, top_p: sampling, as
      :func:`llm_mp.generate.sample_logits`; ``temperature=0`` is greedy.
    rng: PRNG key for sampling (required when ``temperature > 0``).

  Returns:
    int32 ``[B, N]``: generated tokens, EOS, then ``pad_id`` to the end (a row
    that never emits EOS runs to ``N`` tokens).

  Raises:
    ValueError: bad shapes or settings (named with the value).
  """
  src_tokens = jnp.asarray(src_tokens, jnp.int32)
  if src_tokens.ndim != 2 or src_tokens.shape[1] == 0:
    raise ValueError(f"src_tokens must be int[B, S] with S >= 1, got shape {src_tokens.shape}")
  if src_segment_ids is not None and jnp.shape(src_segment_ids) != src_tokens.shape:
    raise ValueError(
      f"src_segment_ids shape {jnp.shape(src_segment_ids)} differs from "
      f"src_tokens shape {src_tokens.shape}"
    )
  if not 1 <= max_new_tokens <= config.max_len:
    raise ValueError(
      f"max_new_tokens={max_new_tokens} must be in [1, model.max_len={config.max_len}]"
    )
  if beam_size < 1:
    raise ValueError(f"beam_size={beam_size} must be >= 1")
  if beam_size > 1 and temperature != 0:
    raise ValueError(
      f"beam search is deterministic: temperature={temperature} must be 0 "
      f"with beam_size={beam_size}"
    )
  if temperature > 0 and rng is None:
    raise ValueError(f"temperature={temperature} samples: pass rng")
  if rng is None:
    rng = jax.random.key(0)
  return _generate(
    params,
    src_tokens,
    src_segment_ids,
    rng,
    config=config,
    precision=precision,
    max_new_tokens=max_new_tokens,
    bos_id=bos_id,
    eos_id=eos_id,
    pad_id=eos_id if pad_id is None else pad_id,
    beam_size=beam_size,
    length_penalty=float(length_penalty),
    temperature=temperature,
    top_k=top_k,
    top_p=top_p,
  )


@functools.partial(
  jax.jit,
  static_argnames=(
    "config",
    "precision",
    "max_new_tokens",
    "bos_id",
    "eos_id",
    "pad_id",
    "beam_size",
    "length_penalty",
    "temperature",
    "top_k",
    "top_p",
  ),
)
def _generate(
  params,
  src_tokens,
  src_segment_ids,
  rng,
  *,
  config,
  precision,
  max_new_tokens,
  bos_id,
  eos_id,
  pad_id,
  beam_size,
  length_penalty,
  temperature,
  top_k,
  top_p,
):
  """:func:`generate_seq2seq` after validation; traced once per shapes and settings."""
  model = build_model(config, precision, decode=True)
  b, s = src_tokens.shape
  encoded = model.apply({"params": params}, src_tokens, src_segment_ids, method=model.encode)
  # Beam w of example b is row b * W + w.
  encoded = jnp.repeat(encoded, beam_size, axis=0)
  src_segments = None if src_segment_ids is None else jnp.repeat(src_segment_ids, beam_size, axis=0)
  rows = b * beam_size

  def step(tokens, position, cache, context=None):  # tokens (R,) at `position` -> (R, V)
    positions = jnp.full((rows, 1), position, jnp.int32)
    logits, mutated = model.apply(
      {"params": params, "cache": cache},
      tokens[:, None],
      context,
      src_segments,
      None,
      positions,
      method=model.decoder_logits,
      mutable=["cache"],
    )
    return logits[:, -1].astype(jnp.float32), mutated["cache"]

  # BOS at position 0, with the context: fills the cross-attention cache.
  logits, cache = step(
    jnp.full((rows,), bos_id, jnp.int32), 0, init_decoder_cache(model, rows, s), context=encoded
  )
  if beam_size == 1:
    return sample_search(
      step,
      cache,
      logits,
      max_new_tokens=max_new_tokens,
      eos_id=eos_id,
      pad_id=pad_id,
      rng=rng,
      temperature=temperature,
      top_k=top_k,
      top_p=top_p,
    )[0]
  reorder = functools.partial(reorder_cache, scan_layers=config.scan_layers)
  return beam_search(
    step,
    reorder,
    cache,
    logits,
    beam_size=beam_size,
    max_new_tokens=max_new_tokens,
    eos_id=eos_id,
    pad_id=pad_id,
    length_penalty=length_penalty,
  )[0]
