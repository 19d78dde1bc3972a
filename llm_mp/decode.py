"""The decoding loops: sampling, greedy and beam search over a KV cache, pure and jittable.

Every search here is a function of a ``step_fn(tokens int[R], i, cache) ->
(logits [R, V], cache)`` that feeds the token written at step ``i - 1`` and
returns the logits for token ``i``; the caller primes it (a decoder-only model
with its prompt, an encoder-decoder with BOS and the encoder output) and gives
the first logits. :mod:`llm_mp.generate` builds that step for both families;
the tests also drive the searches with hand-built steps whose best sequence is
known. Each search is one ``lax.while_loop``.

:func:`sample_logits` draws tokens with temperature, top-k and top-p (nucleus)
truncation, in fp32; temperature 0 is greedy.

Beam search follows GNMT / T5: a finished hypothesis of ``L`` tokens (its EOS
included) scores ``log p / ((5 + L) / 6) ** length_penalty``; each step keeps
the ``beam_size`` best unfinished continuations and the ``beam_size`` best
finished hypotheses; a hypothesis reaching ``max_new_tokens`` without EOS is
finished there. The loop stops early once, for every example, the beam of
finished hypotheses is full and no live beam can still beat its worst one.

:func:`init_cache` makes the empty cache of a model built with ``decode=True``
(a decoder-only model, or an encoder-decoder given the source length);
:func:`reorder_cache` moves its rows after the beams that own them.

:func:`block_repeated_ngrams` wraps a step (and the beams' reorder) so that no
row's output repeats an n-gram (fairseq's / Hugging Face's
``no_repeat_ngram_size``); both searches then run unchanged.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

# Finite "minus infinity" for scores: -inf - (-inf) would give NaN in comparisons.
NEG = -1.0e9
StepFn = Callable[[jax.Array, Any, Any], tuple[jax.Array, Any]]


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
  """Raises ValueError (naming the value) unless ``temperature >= 0``, ``top_k``
  is None or ``>= 1`` and ``top_p`` is None or in ``(0, 1]``."""
  if temperature < 0:
    raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
  if top_k is not None and top_k < 1:
    raise ValueError(f"top_k={top_k} must be >= 1 or None")
  if top_p is not None and not 0 < top_p <= 1:
    raise ValueError(f"top_p={top_p} must be in (0, 1] or None")


def sample_logits(
  logits: jax.Array,
  rng: jax.Array,
  temperature: float = 1.0,
  top_k: int | None = None,
  top_p: float | None = None,
) -> jax.Array:
  """One token per row from ``softmax(logits / temperature)``, truncated.

  The logits are divided by the temperature first; top-k then keeps the ``k``
  most likely tokens (ties go to the lower id); top-p then keeps, of those, the
  smallest most-likely-first set whose renormalised mass is >= ``top_p``.
  Tokens outside the kept set are never drawn.

  Args:
    logits: ``[B, V]``, any float dtype; sampling runs in fp32.
    rng: a PRNG key (unused when greedy).
    temperature: 0 = greedy (argmax; top-k and top-p then change nothing).
    top_k: ``>= 1``, or None for no top-k truncation.
    top_p: in ``(0, 1]``, or None for no nucleus truncation.

  Returns:
    int32 ``[B]`` token ids.

  Raises:
    ValueError: ``temperature < 0``, ``top_k < 1`` or ``top_p`` outside ``(0, 1]``.
  """
  check_sampling(temperature, top_k, top_p)
  logits = logits.astype(jnp.float32)  # kept in fp32: softmax mass and cumulative sums
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_k is None and top_p is None:
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)
  # Sample a rank among the k best (k = V: a full sort), then map it back to an id.
  ranked, ids = jax.lax.top_k(logits, min(top_k or logits.shape[-1], logits.shape[-1]))
  if top_p is not None and top_p < 1:
    probs = jax.nn.softmax(ranked, axis=-1)  # (B, k), most likely first
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    ranked = jnp.where(mass_before < top_p, ranked, -jnp.inf)
  rank = jax.random.categorical(rng, ranked, axis=-1)  # (B,)
  return jnp.take_along_axis(ids, rank[:, None], axis=-1)[:, 0].astype(jnp.int32)


def length_penalty_factor(length: Any, alpha: float) -> jax.Array:
  """GNMT's ``((5 + length) / 6) ** alpha`` (fp32); scores are ``log p`` over it."""
  return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def _write(seqs: jax.Array, i: jax.Array, tokens: jax.Array) -> jax.Array:
  """``seqs[..., i] = tokens`` for a traced ``i``."""
  return jnp.where(jnp.arange(seqs.shape[-1]) == i, tokens[..., None], seqs)


def _eos(eos_id: int | None) -> int:
  return -1 if eos_id is None else eos_id  # -1: no token ends a row


def sample_search(
  step_fn: StepFn,
  state: Any,
  logits: jax.Array,
  *,
  max_new_tokens: int,
  eos_id: int | None,
  pad_id: int,
  rng: jax.Array,
  temperature: float = 0.0,
  top_k: int | None = None,
  top_p: float | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Greedy (``temperature=0``) or sampled decoding, one token per row per step.

  Args:
    step_fn: ``(tokens int[B], i, state) -> (logits [B, V], state)``: feeds
      the token written at step ``i - 1``, returns the logits of token ``i``.
    state: what ``step_fn`` threads (the cache).
    logits: ``[B, V]`` for the first token (from the priming call).
    max_new_tokens: ``N``, the most tokens written per row.
    eos_id, pad_id: after a row writes ``eos_id`` it writes only ``pad_id``;
      ``eos_id=None``: rows never end before ``N`` tokens.
    rng: step ``i`` samples with ``fold_in(rng, i)``.
    temperature, top_k, top_p: as :func:`sample_logits`.

  Returns:
    ``(tokens int32[B, N], steps int32[])``; the loop stops once every row is done.
  """
  b = logits.shape[0]
  eos = _eos(eos_id)
  sample = functools.partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p)

  def emit(i, logits, out, done):
    token = jnp.where(done, pad_id, sample(logits, jax.random.fold_in(rng, i)))
    return token, _write(out, i, token), done | (token == eos)

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
  eos_id: int | None,
  pad_id: int,
  length_penalty: float = 0.6,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Beam search with GNMT's length penalty (see the module docstring).

  Args:
    step_fn: ``(tokens int[B*W], i, state) -> (logits [B*W, V], state)``;
      row ``b * W + w`` is beam ``w`` of example ``b``.
    reorder_fn: ``(state, rows int[B*W]) -> state`` whose row ``r`` is the
      old row ``rows[r]`` (beams follow their parents).
    state: what ``step_fn`` threads.
    logits: ``[B*W, V]`` for the first token (all beams of an example equal).
    beam_size: ``W``.
    max_new_tokens: ``N``.
    eos_id, pad_id: a hypothesis ends at ``eos_id``, then ``pad_id`` to ``N``;
      ``eos_id=None``: every hypothesis runs to ``N`` tokens.
    length_penalty: ``alpha``; 0 ranks by ``log p`` alone.

  Returns:
    ``(tokens int32[B, N], scores float32[B], steps int32[])``: the best
    hypothesis of each example, its score, and the tokens positions searched.
  """
  w = beam_size
  v = logits.shape[-1]
  b = logits.shape[0] // w
  n = max_new_tokens
  eos = _eos(eos_id)
  top = lambda x, k: jax.lax.top_k(x, k)
  pick = lambda x, idx: jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)

  def select(i, logits, live_seqs, live_logp, fin_seqs, fin_scores, fin_flags):
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1).reshape(b, w, v)
    cand = (live_logp[..., None] + logp).reshape(b, w * v)
    # 2W candidates hold at least W that are not EOS (each parent has one EOS).
    cand_logp, cand_idx = top(cand, 2 * w)  # (B, 2W)
    parent, token = cand_idx // v, cand_idx % v
    seqs = _write(pick(live_seqs, parent), i, token)  # (B, 2W, N)
    is_eos = token == eos
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
  # Only beam 0 is live at first: W copies of one start would give W equal beams.
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


def _banned_ngram_tokens(logits: jax.Array, seqs: jax.Array, i: Any, n: int) -> jax.Array:
  """``logits`` with ``NEG`` for every token that would complete an ``n``-gram
  already in its row's output.

  Args:
    logits: ``[R, V]`` float, the logits of token ``i``.
    seqs: int ``[R, N]``, each row's output; positions ``0 .. i-1`` are written.
    i: the position being chosen (traced int).
    n: ``>= 1``; the last ``n - 1`` tokens are compared with every earlier
      ``(n - 1)``-gram of the row and the tokens that followed them are banned
      (``n = 1``: every token already written).

  Returns:
    ``[R, V]``, ``logits``' dtype.
  """
  r, width = seqs.shape
  m = width - n + 1  # n-grams that fit in a row: starts 0 .. m - 1
  if m <= 0:
    return logits
  windows = jnp.stack([seqs[:, k : k + m] for k in range(n - 1)], axis=-1)  # (R, M, n-1)
  last = jnp.take(seqs, jnp.clip(i - (n - 1) + jnp.arange(n - 1), 0, width - 1), axis=1)
  # An earlier n-gram is one whose last token (position j + n - 1) is already written.
  match = jnp.all(windows == last[:, None, :], axis=-1) & (jnp.arange(m) + n - 1 < i)
  followers = seqs[:, n - 1 :]  # (R, M): the token ending the n-gram that starts at j
  hits = jnp.zeros(logits.shape, jnp.int32).at[jnp.arange(r)[:, None], followers].add(match)
  return jnp.where(hits > 0, jnp.asarray(NEG, logits.dtype), logits)


def block_repeated_ngrams(
  step_fn: StepFn,
  reorder_fn: Callable[[Any, jax.Array], Any],
  state: Any,
  rows: int,
  max_new_tokens: int,
  n: int,
) -> tuple[StepFn, Callable[[Any, jax.Array], Any], Any]:
  """A step, reorder and state for :func:`sample_search` / :func:`beam_search`
  that never let a row repeat an ``n``-gram of its own output.

  The state becomes ``(state, seqs int32[rows, max_new_tokens])``: the step
  writes the token it is fed at position ``i - 1`` and passes its logits
  through :func:`_banned_ngram_tokens`; the reorder moves ``seqs``' rows with
  the beams. The first logits need nothing (no output yet). Fixed shapes, jittable.

  Args:
    step_fn, reorder_fn, state: as the searches take them.
    rows: ``R``, the batch rows (examples times beams).
    max_new_tokens: ``N``.
    n: ``>= 1``, the n-gram size.

  Returns:
    ``(step_fn, reorder_fn, state)`` to pass to the search in their place.

  Raises:
    ValueError: ``n < 1``.
  """
  if n < 1:
    raise ValueError(f"no_repeat_ngram_size={n} must be >= 1 here (0 = off: do not wrap)")

  def step(tokens, i, carry):
    inner, seqs = carry
    seqs = _write(seqs, i - 1, tokens)
    logits, inner = step_fn(tokens, i, inner)
    return _banned_ngram_tokens(logits, seqs, i, n), (inner, seqs)

  def reorder(carry, parents):
    inner, seqs = carry
    return reorder_fn(inner, parents), jnp.take(seqs, parents, axis=0)

  return step, reorder, (state, jnp.zeros((rows, max_new_tokens), jnp.int32))


def init_cache(model: Any, batch_size: int, src_len: int | None = None) -> Any:
  """The empty ``cache`` collection of ``model`` (built with ``decode=True``).

  Per attention layer: the self-attention ``cached_key``/``cached_value``
  zeros ``[batch_size, max_len, kv_heads, head_dim]`` in the key/value
  projections' output dtype (a leading ``layers`` axis under ``scan_layers``)
  and an int32 ``index`` of 0. With ``src_len`` (an
  :class:`~llm_mp.models.EncoderDecoder`) also each decoder layer's
  cross-attention ``context_key``/``context_value`` ``[batch_size, src_len,
  kv_heads, head_dim]``, zeros until the first step fills them; without it the
  model is a decoder-only :class:`~llm_mp.models.TransformerLM`. Only shapes
  are traced: no parameters are initialised.
  """
  tokens = jnp.zeros((batch_size, model.config.max_len), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(model.config.max_len), tokens.shape)
  if src_len is None:
    init = lambda: model.init(jax.random.key(0), tokens, positions=positions)
  else:
    src = jnp.zeros((batch_size, src_len), jnp.int32)
    init = lambda: model.init(jax.random.key(0), src, None, tokens, decoder_positions=positions)
  shapes = jax.eval_shape(lambda: init()["cache"])
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
