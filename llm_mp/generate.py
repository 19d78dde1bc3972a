"""KV-cache text generation: prompt prefill, a jitted decode loop, sampling.

:func:`generate` is a pure function of ``(params, prompt, rng)``. Inside one
``jax.jit`` (static: config, policy, lengths, sampling settings) it creates an
empty cache, runs the whole prompt through the model in one ``apply``, then
decodes one token per ``lax.while_loop`` step against the cache. A second call
with the same shapes and settings does not recompile.

:func:`sample_logits` draws tokens with temperature, top-k and top-p (nucleus)
truncation, in fp32. :func:`generate_text` wraps both for a tokenizer and a
string prompt (the CLI's ``generate``).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from llm_mp.config import ModelConfig
from llm_mp.models import TransformerLM, build_model
from llm_mp.precision import Precision

if TYPE_CHECKING:
  from llm_mp.data import Tokenizer


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
  if temperature < 0:
    raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
  if top_k is not None and top_k < 1:
    raise ValueError(f"top_k={top_k} must be >= 1 or None")
  if top_p is not None and not 0 < top_p <= 1:
    raise ValueError(f"top_p={top_p} must be in (0, 1] or None")
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


def init_cache(model: TransformerLM, batch_size: int) -> Any:
  """An empty KV cache for ``model`` (built with ``decode=True``).

  Returns the ``cache`` collection: per layer, ``cached_key``/``cached_value``
  zeros of shape ``[batch_size, max_len, kv_heads, head_dim]`` in the key/value
  projections' output dtype (a leading ``layers`` axis under ``scan_layers``)
  and an int32 ``index`` of 0. Only shapes are traced: no parameters are
  initialised.
  """
  tokens = jnp.zeros((batch_size, model.config.max_len), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(model.config.max_len), tokens.shape)
  shapes = jax.eval_shape(
    lambda: model.init(jax.random.key(0), tokens, positions=positions)["cache"]
  )
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


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
) -> jax.Array:
  """Continues ``prompt`` by ``max_new_tokens`` tokens with a KV cache.

  Every row has the same prompt length ``P`` (no padding). The prompt fills
  the cache in one forward pass; each new token then costs one single-token
  pass. Step ``i`` samples with ``jax.random.fold_in(rng, i)`` (see
  :func:`sample_logits` for the sampling settings).

  Args:
    model_config: the model's architecture.
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

  Returns:
    int32 ``[B, P + N]``: the prompt followed by the new tokens.

  Raises:
    ValueError: an empty or non-2-D prompt, ``N < 1``, ``P + N`` longer than
      ``model.max_len``, or bad sampling settings.
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
  return _generate(
    params,
    prompt,
    rng,
    config=model_config,
    precision=precision,
    max_new_tokens=max_new_tokens,
    temperature=temperature,
    top_k=top_k,
    top_p=top_p,
    eos_id=eos_id,
  )


@functools.partial(
  jax.jit,
  static_argnames=(
    "config",
    "precision",
    "max_new_tokens",
    "temperature",
    "top_k",
    "top_p",
    "eos_id",
  ),
)
def _generate(
  params, prompt, rng, *, config, precision, max_new_tokens, temperature, top_k, top_p, eos_id
):
  """:func:`generate` after validation; traced once per shapes and settings."""
  model = build_model(config, precision, decode=True)
  variables = params if "params" in params else {"params": params}
  b, p = prompt.shape
  sample = functools.partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p)

  def forward(cache, tokens, start):  # tokens (B, L) at positions start.. -> last logits (B, V)
    positions = start + jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    logits, mutated = model.apply(
      {**variables, "cache": cache}, tokens, positions=positions, mutable=["cache"]
    )
    # Padded vocabulary columns (model.vocab_multiple) are dropped, not just masked,
    # so the random draws, hence the samples, are those of the unpadded model.
    return logits[:, -1, : config.vocab_size], mutated["cache"]

  def emit(i, logits, out, done):  # samples new token i, writes it at P + i
    token = sample(logits, jax.random.fold_in(rng, i))
    if eos_id is not None:
      token = jnp.where(done, eos_id, token)
      done = done | (token == eos_id)
    return token, jax.lax.dynamic_update_slice_in_dim(out, token[:, None], p + i, axis=1), done

  # Unwritten slots (left by an early stop) read as eos.
  fill = 0 if eos_id is None else eos_id
  out = jnp.full((b, p + max_new_tokens), fill, jnp.int32).at[:, :p].set(prompt)
  logits, cache = forward(init_cache(model, b), prompt, 0)
  token, out, done = emit(0, logits, out, jnp.zeros((b,), bool))

  def cond(state):
    i, _, _, _, done = state
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(state):
    i, token, cache, out, done = state
    logits, cache = forward(cache, token[:, None], p + i - 1)
    token, out, done = emit(i, logits, out, done)
    return i + 1, token, cache, out, done

  return jax.lax.while_loop(cond, body, (1, token, cache, out, done))[3]


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
) -> str:
  """The text the model writes after ``prompt`` (the prompt itself excluded).

  The prompt is encoded as ``[tokenizer.bos_id] + tokenizer.encode(prompt)``,
  as documents start in the token files, so ``prompt=""`` samples from scratch.
  Generation stops at ``tokenizer.eos_id``, which is not decoded.

  Args:
    tokenizer: anything with ``encode``, ``decode``, ``bos_id`` and ``eos_id``
      (an :class:`llm_mp.data.Tokenizer`).
    seed: the sampling PRNG seed.
    model_config, precision, params, max_new_tokens, temperature, top_k, top_p:
      as for :func:`generate`.

  Raises:
    ValueError: as :func:`generate` (the bos token counts in the prompt length).
  """
  ids = [tokenizer.bos_id] + list(tokenizer.encode(prompt))
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
  )
  new = [int(t) for t in out[0, len(ids) :]]
  if tokenizer.eos_id in new:
    new = new[: new.index(tokenizer.eos_id)]
  return tokenizer.decode(new)
