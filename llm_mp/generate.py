"""Generation for both model families: tokens in, tokens out, and text in, text out.

:func:`generate` continues decoder-only prompts; :func:`generate_seq2seq`
writes an encoder-decoder's targets for source rows. Both run one jitted
function (static: config, policy, lengths, search settings; a second call
with the same shapes and settings does not recompile) that builds the model
through the builder (its "auto" choices resolved), makes an empty KV cache,
primes it, and hands one step function to :mod:`llm_mp.decode`'s loops:
sampling / greedy (``beam_size=1``) or beam search.

* Decoder-only: the whole prompt fills the cache in one ``apply``; then each
  new token costs one single-token pass at the next position.
* Encoder-decoder: the encoder runs once and its output is repeated for the
  beams; the decoder is primed with BOS at position 0, a call that projects
  the encoder output to every layer's cross-attention keys/values and caches
  them; later steps pass no context and read the cache.

:func:`generate_text` and :func:`generate_seq2seq_text` wrap these for a
tokenizer and a string. A prompt is encoded as the tokenizer encodes text with
its special tokens (:func:`encode_prompt`), so an imported Hugging Face
checkpoint generates what ``transformers`` generates from the same text.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from llm_mp.config import ModelConfig
from llm_mp.decode import (
  beam_search,
  block_repeated_ngrams,
  check_sampling,
  init_cache,
  reorder_cache,
  sample_search,
)
from llm_mp.models import build_resolved_model
from llm_mp.precision import Precision

if TYPE_CHECKING:
  from llm_mp.data import Tokenizer


def _check_search(beam_size: int, temperature: float, top_k, top_p) -> None:
  """Raises ValueError (naming the value) for settings no search takes."""
  if beam_size < 1:
    raise ValueError(f"beam_size={beam_size} must be >= 1")
  if beam_size > 1 and temperature != 0:
    raise ValueError(
      f"beam search is deterministic: temperature={temperature} must be 0 "
      f"with beam_size={beam_size}"
    )
  check_sampling(temperature, top_k, top_p)


def generate(
  model_config: ModelConfig,
  precision: Precision,
  params: Any,
  prompt: jax.Array,
  max_new_tokens: int,
  rng: jax.Array,
  temperature: float = 1.0,
  top_k: int | None = None,
  top_p: float | None = None,
  eos_id: int | None = None,
  beam_size: int = 1,
  length_penalty: float = 0.6,
) -> jax.Array:
  """Continues a decoder-only model's ``prompt`` by ``max_new_tokens`` tokens.

  Every row has the same prompt length ``P`` (no padding). The prompt fills
  the cache in one forward pass; each new token then costs one single-token
  pass. Step ``i`` samples with ``jax.random.fold_in(rng, i)`` (see
  :func:`llm_mp.decode.sample_logits` for the sampling settings).

  Args:
    model_config: the model's architecture (``family="decoder"``).
    precision: the policy the model runs in; the cache takes the key/value
      projections' output dtype (bf16 under the ``bf16`` preset).
    params: the ``TransformerLM`` parameters, laid out for
      ``model_config.scan_layers`` (stacked, or one subtree per block), or
      ``{"params": ..., **collections}`` such as ``TrainState.variables``,
      whose other collections (fp8 scales) are read, never updated.
    prompt: int ``[B, P]``, ``P >= 1``.
    max_new_tokens: ``N >= 1`` tokens to add.
    rng: a PRNG key.
    temperature, top_k, top_p: sampling settings; ``temperature=0`` is greedy.
    eos_id: once a row emits it, that row emits only ``eos_id`` afterwards;
      the loop stops early when every row has. None = always ``N`` tokens.
    beam_size: 1 = greedy or sampling; ``W > 1`` = beam search
      (``temperature`` must be 0), the best hypothesis of each row returned.
    length_penalty: beam search's ``alpha`` (see :mod:`llm_mp.decode`).

  Returns:
    int32 ``[B, P + N]``: the prompt followed by the new tokens.

  Raises:
    ValueError: an empty or non-2-D prompt, ``N < 1``, ``P + N`` longer than
      ``model.max_len``, or bad search settings.
  """
  prompt = jnp.asarray(prompt, jnp.int32)
  if prompt.ndim != 2 or prompt.shape[1] == 0:
    raise ValueError(f"prompt must be int[B, P] with P >= 1 tokens, got shape {prompt.shape}")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
  total = prompt.shape[1] + max_new_tokens
  if total > model_config.max_len:
    raise ValueError(
      f"prompt length {prompt.shape[1]} + max_new_tokens={max_new_tokens} = "
      f"{total} is longer than model.max_len={model_config.max_len}"
    )
  _check_search(beam_size, temperature, top_k, top_p)
  new = _decode(
    params,
    prompt,
    None,
    None,
    rng,
    config=model_config,
    precision=precision,
    max_new_tokens=max_new_tokens,
    eos_id=eos_id,
    pad_id=0 if eos_id is None else eos_id,
    beam_size=beam_size,
    length_penalty=float(length_penalty),
    temperature=temperature,
    top_k=top_k,
    top_p=top_p,
  )
  return jnp.concatenate([prompt, new], axis=1)


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
  no_repeat_ngram_size: int = 0,
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
    params: the :class:`~llm_mp.models.EncoderDecoder` parameters (or
      ``{"params": ..., **collections}``).
    src_tokens: int ``[B, S]``; ``src_segment_ids`` int ``[B, S]`` (0 =
      padding, never attended to) or None (every token real).
    max_new_tokens: ``N``, at most ``model.max_len`` (the decoder cache length).
    bos_id: the decoder's first input; eos_id: ends a row; pad_id: fills a row
      after its EOS (default ``eos_id``).
    beam_size: 1 = greedy or sampling; ``W > 1`` = beam search (``temperature``
      must be 0). Beam size 1 with ``length_penalty=0`` is greedy decoding.
    length_penalty: beam search's ``alpha`` (GNMT / T5; 0.6 is their default).
    no_repeat_ngram_size: ``n >= 1``: no row (hypothesis) repeats an
      ``n``-gram of its own output (a token that would complete one gets the
      searches' ``-inf``, :data:`llm_mp.decode.NEG`:
      :func:`llm_mp.decode.block_repeated_ngrams`); 0 = off.
    temperature, top_k, top_p: sampling, as
      :func:`llm_mp.decode.sample_logits`; ``temperature=0`` is greedy.
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
  _check_search(beam_size, temperature, top_k, top_p)
  if no_repeat_ngram_size < 0:
    raise ValueError(f"no_repeat_ngram_size={no_repeat_ngram_size} must be >= 0 (0 = off)")
  if temperature > 0 and rng is None:
    raise ValueError(f"temperature={temperature} samples: pass rng")
  return _decode(
    params,
    jnp.full((src_tokens.shape[0], 1), bos_id, jnp.int32),
    src_tokens,
    src_segment_ids,
    jax.random.key(0) if rng is None else rng,
    config=config,
    precision=precision,
    max_new_tokens=max_new_tokens,
    eos_id=eos_id,
    pad_id=eos_id if pad_id is None else pad_id,
    beam_size=beam_size,
    length_penalty=float(length_penalty),
    no_repeat_ngram_size=no_repeat_ngram_size,
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
    "eos_id",
    "pad_id",
    "beam_size",
    "length_penalty",
    "no_repeat_ngram_size",
    "temperature",
    "top_k",
    "top_p",
  ),
)
def _decode(
  params,
  prefix,
  src_tokens,
  src_segment_ids,
  rng,
  *,
  config,
  precision,
  max_new_tokens,
  eos_id,
  pad_id,
  beam_size,
  length_penalty,
  temperature,
  top_k,
  top_p,
  no_repeat_ngram_size=0,
):
  """The one decoding function: ``prefix`` int ``[B, P]`` primes the decoder
  (the prompt, or BOS for an encoder-decoder, whose source is ``src_tokens``
  int ``[B, S]``; None for a decoder-only model) -> new tokens int32 ``[B, N]``."""
  model = build_resolved_model(config, precision, decode=True)
  variables = params if "params" in params else {"params": params}
  # Beam w of example b is row b * W + w.
  prefix = jnp.repeat(prefix, beam_size, axis=0)
  rows, p = prefix.shape
  seq2seq = src_tokens is not None
  context, src_segments = None, None
  if seq2seq:
    encoded = model.apply(variables, src_tokens, src_segment_ids, method=model.encode)
    context = jnp.repeat(encoded, beam_size, axis=0)
    if src_segment_ids is not None:
      src_segments = jnp.repeat(src_segment_ids, beam_size, axis=0)

  def forward(cache, tokens, start, context=None):  # tokens (R, L) at start.. -> (R, V)
    positions = start + jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    with_cache = {**variables, "cache": cache}
    if seq2seq:
      logits, mutated = model.apply(
        with_cache,
        tokens,
        context,
        src_segments,
        None,
        positions,
        method=model.decoder_logits,
        mutable=["cache"],
      )
    else:
      logits, mutated = model.apply(with_cache, tokens, positions=positions, mutable=["cache"])
    # Padded vocabulary columns (model.vocab_multiple) are dropped, not just masked,
    # so the random draws, hence the samples, are those of the unpadded model.
    return logits[:, -1, : config.vocab_size].astype(jnp.float32), mutated["cache"]

  cache = init_cache(model, rows, src_tokens.shape[1] if seq2seq else None)
  logits, cache = forward(cache, prefix, 0, context)
  step = lambda tokens, i, cache: forward(cache, tokens[:, None], p - 1 + i)
  reorder = functools.partial(reorder_cache, scan_layers=config.scan_layers)
  if no_repeat_ngram_size:
    step, reorder, cache = block_repeated_ngrams(
      step, reorder, cache, rows, max_new_tokens, no_repeat_ngram_size
    )
  search = dict(max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id)
  if beam_size == 1:
    return sample_search(
      step, cache, logits, rng=rng, temperature=temperature, top_k=top_k, top_p=top_p, **search
    )[0]
  return beam_search(
    step, reorder, cache, logits, beam_size=beam_size, length_penalty=length_penalty, **search
  )[0]


def encode_prompt(tokenizer: Tokenizer, text: str) -> list[int]:
  """``text`` as the tokenizer encodes it with its special tokens: ``bos_id``
  first when ``tokenizer.add_bos`` (the byte tokenizer, our own BPE, a LLaMA
  template; not GPT-2's), then ``tokenizer.encode(text)``. An empty result is
  ``[bos_id]``, the start ``transformers`` generates from without input ids."""
  ids = [tokenizer.bos_id] * bool(tokenizer.add_bos) + list(tokenizer.encode(text))
  return ids or [tokenizer.bos_id]


def _until_eos(ids: Any, eos_id: int) -> list[int]:
  ids = [int(t) for t in ids]
  return ids[: ids.index(eos_id)] if eos_id in ids else ids


def generate_text(
  model_config: ModelConfig,
  precision: Precision,
  params: Any,
  tokenizer: Tokenizer,
  prompt: str,
  max_new_tokens: int,
  seed: int = 0,
  temperature: float = 1.0,
  top_k: int | None = None,
  top_p: float | None = None,
  beam_size: int = 1,
  length_penalty: float = 0.6,
) -> str:
  """The text a decoder-only model writes after ``prompt`` (the prompt itself excluded).

  The prompt is encoded by :func:`encode_prompt` (``""`` samples from the bos
  token). Generation stops at ``tokenizer.eos_id``, which is not decoded.

  Args:
    tokenizer: anything with ``encode``, ``decode``, ``bos_id``, ``eos_id``
      and ``add_bos`` (an :class:`llm_mp.data.Tokenizer`).
    seed: the sampling PRNG seed.
    model_config, precision, params, max_new_tokens, temperature, top_k, top_p,
      beam_size, length_penalty: as for :func:`generate`.

  Raises:
    ValueError: as :func:`generate` (a bos token counts in the prompt length).
  """
  ids = encode_prompt(tokenizer, prompt)
  out = generate(
    model_config,
    precision,
    params,
    jnp.asarray([ids], jnp.int32),
    max_new_tokens,
    jax.random.key(seed),
    temperature=temperature,
    top_k=top_k,
    top_p=top_p,
    eos_id=tokenizer.eos_id,
    beam_size=beam_size,
    length_penalty=length_penalty,
  )
  return tokenizer.decode(_until_eos(out[0, len(ids) :], tokenizer.eos_id))


def generate_seq2seq_text(
  config: ModelConfig,
  precision: Precision,
  params: Any,
  source_tokenizer: Tokenizer,
  target_tokenizer: Tokenizer,
  source: str,
  max_new_tokens: int,
  seed: int = 0,
  temperature: float = 0.0,
  top_k: int | None = None,
  top_p: float | None = None,
  beam_size: int = 1,
  length_penalty: float = 0.6,
  no_repeat_ngram_size: int = 0,
) -> str:
  """An encoder-decoder's output text for ``source`` (a translation, a summary).

  The source is encoded as in training (``tokens + [EOS]``, cut to
  ``model.max_len``); the decoder starts at the target tokenizer's BOS and
  stops at its EOS, which is not decoded.

  Args:
    source_tokenizer, target_tokenizer: the run's (the same one when shared).
    seed: the sampling PRNG seed.
    config, precision, params, max_new_tokens, temperature, top_k, top_p,
      beam_size, length_penalty, no_repeat_ngram_size: as for :func:`generate_seq2seq`.

  Raises:
    ValueError: as :func:`generate_seq2seq`.
  """
  ids = (list(source_tokenizer.encode(source)) + [source_tokenizer.eos_id])[: config.max_len]
  out = generate_seq2seq(
    config,
    precision,
    params,
    jnp.asarray([ids], jnp.int32),
    max_new_tokens=max_new_tokens,
    bos_id=target_tokenizer.bos_id,
    eos_id=target_tokenizer.eos_id,
    pad_id=target_tokenizer.pad_id,
    beam_size=beam_size,
    length_penalty=length_penalty,
    no_repeat_ngram_size=no_repeat_ngram_size,
    temperature=temperature,
    top_k=top_k,
    top_p=top_p,
    rng=jax.random.key(seed),
  )
  return target_tokenizer.decode(_until_eos(out[0], target_tokenizer.eos_id))
