"""BERT's masked-LM corruption of token rows (on device, inside the jitted step).

Each maskable token is selected with probability ``p`` (15% in BERT); a
selected token is replaced by [MASK] 80% of the time, by a uniformly random
token 10% of the time and kept 10% of the time; the model is trained to
predict the original token at every selected position and nowhere else.

The [MASK] id: llm_mp's tokenizers have no mask token, so the tokenizer's
``pad_id`` plays [MASK]. Padding is never attended to (segment 0) and never a
target, so the pad embedding is otherwise unused, and reusing it adds no row
to the embedding table or the output layer. (A masked token keeps its
document's segment id, so it is attended to like any real token.)
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def maskable_tokens(
  inputs: jax.Array, segment_ids: jax.Array | None, special_ids: Sequence[int]
) -> jax.Array:
  """bool ``[B, T]``: real tokens (``segment_ids > 0``) that are not special.

  Args:
    inputs: int ``[B, T]`` token ids.
    segment_ids: int ``[B, T]`` (0 = padding) or None (every position real).
    special_ids: ids never selected, e.g. ``(tok.pad_id, tok.bos_id, tok.eos_id)``.
  """
  ok = ~jnp.isin(inputs, jnp.asarray(tuple(special_ids), inputs.dtype))
  return ok if segment_ids is None else ok & (segment_ids > 0)


def mlm_mask(
  rng: jax.Array,
  inputs: jax.Array,
  maskable: jax.Array,
  *,
  probability: float,
  mask_id: int,
  vocab_size: int,
  low: int = 0,
  mask_fraction: float = 0.8,
  random_fraction: float = 0.1,
) -> tuple[jax.Array, jax.Array]:
  """Masked-LM inputs and targets for one batch (pure ``jnp``; jit-able).

  Args:
    rng: a PRNG key; the draw is a pure function of it.
    inputs: int ``[B, T]`` token ids.
    maskable: bool ``[B, T]``, positions that may be selected (real tokens that
      are not BOS/EOS/pad: :func:`maskable_tokens`).
    probability: chance that each maskable position is selected (Bernoulli).
    mask_id: the [MASK] id; by llm_mp's convention the tokenizer's ``pad_id``
      (see the module docstring).
    vocab_size, low: random replacements are uniform over ``[low, vocab_size)``;
      pass the range of ordinary tokens (byte tokenizer: ``[0, 256)``; BPE:
      ``[3, vocab)``, its specials being 0..2) so no special id is drawn.
    mask_fraction, random_fraction: split of the selected positions into
      [MASK] and random replacements; the rest keep their token (BERT:
      0.8 / 0.1, leaving 0.1).

  Returns:
    ``(masked_inputs, targets)``, both int32 ``[B, T]``: ``masked_inputs``
    equals ``inputs`` except at the replaced positions; ``targets`` is the
    original token at selected positions and -1 elsewhere (the loss counts
    only ``targets >= 0``).

  Raises:
    ValueError: a Python-number ``probability`` outside (0, 1), fractions that
      do not fit in [0, 1], or an empty ``[low, vocab_size)``.
  """
  if isinstance(probability, (int, float)) and not 0.0 < probability < 1.0:
    raise ValueError(f"mlm_mask probability={probability!r} must be in (0, 1)")
  if not (
    0.0 <= mask_fraction and 0.0 <= random_fraction and mask_fraction + random_fraction <= 1.0
  ):
    raise ValueError(
      f"mlm_mask mask_fraction={mask_fraction!r} and random_fraction="
      f"{random_fraction!r} must be >= 0 and sum to <= 1"
    )
  if not 0 <= low < vocab_size:
    raise ValueError(
      f"mlm_mask needs 0 <= low < vocab_size, got low={low}, vocab_size={vocab_size}"
    )
  inputs = inputs.astype(jnp.int32)
  k_select, k_kind, k_token = jax.random.split(rng, 3)
  selected = jax.random.bernoulli(k_select, probability, inputs.shape) & maskable
  # One uniform draw per position picks its fate: [0, m) mask, [m, m+r) random, else keep.
  u = jax.random.uniform(k_kind, inputs.shape)
  random_tokens = jax.random.randint(k_token, inputs.shape, low, vocab_size, jnp.int32)
  replaced = jnp.where(
    u < mask_fraction,
    jnp.asarray(mask_id, jnp.int32),
    jnp.where(u < mask_fraction + random_fraction, random_tokens, inputs),
  )
  masked_inputs = jnp.where(selected, replaced, inputs)
  targets = jnp.where(selected, inputs, jnp.int32(-1))
  return masked_inputs, targets
