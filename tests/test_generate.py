"""KV-cache generation against the full forward pass; sampling distributions; errors."""

import dataclasses
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_mp import decode
from llm_mp import generate as gen
from llm_mp.config import ModelConfig
from llm_mp.data.tokenizer import BpeTokenizer, ByteTokenizer, load_tokenizer
from llm_mp.models import TransformerLM, build_resolved_model
from llm_mp.precision import make_precision

GPT2 = ModelConfig.gpt2(vocab_size=61, d_model=32, n_layers=2, n_heads=4, max_len=24)
LLAMA = ModelConfig.llama(
  vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_len=24
)
CONFIGS = {
  "gpt2": GPT2,
  "llama": LLAMA,  # RoPE, grouped-query attention (2 kv heads for 4 query heads)
  "gpt2_scan": dataclasses.replace(GPT2, scan_layers=True),
  "llama_scan": dataclasses.replace(LLAMA, scan_layers=True),
}
FP32 = make_precision("fp32")


def _tokens(b, t, vocab=61, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (b, t)), jnp.int32)


@functools.cache  # initialising compiles for seconds on CPU: once per config
def _params(cfg):
  model = TransformerLM(cfg, FP32)
  init = jax.jit(lambda rng: nn.unbox(model.init(rng, jnp.zeros((1, 8), jnp.int32))["params"]))
  return model, init(jax.random.key(0))


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.slow
def test_greedy_tokens_are_argmax_of_the_full_forward_pass(name):
  cfg = CONFIGS[name]
  model, params = _params(cfg)
  # 4x the init scale: sharp enough logits that a position or cache slot off by
  # one changes some argmax (at 1x they do not), top-2 gaps still >= 5e-3.
  params = jax.tree.map(lambda x: 4 * x, params)
  p, n = 5, 12
  out = gen.generate(cfg, FP32, params, _tokens(2, p), n, jax.random.key(1), temperature=0.0)
  chex.assert_shape(out, (2, p + n))
  chex.assert_type(out, jnp.int32)
  np.testing.assert_array_equal(out[:, :p], _tokens(2, p))
  logits = jax.jit(model.apply)({"params": params}, out[:, :-1])  # no cache
  np.testing.assert_array_equal(out[:, p:], jnp.argmax(logits[:, p - 1 :], axis=-1))


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.slow
def test_cached_logits_equal_full_forward_logits(name):
  cfg = CONFIGS[name]
  model, params = _params(cfg)
  decoder = TransformerLM(cfg, FP32, decode=True)
  tokens, p = _tokens(2, 16), 6
  full = jax.jit(model.apply)({"params": params}, tokens)
  step = jax.jit(
    lambda cache, chunk, positions: decoder.apply(
      {"params": params, "cache": cache}, chunk, positions=positions, mutable=["cache"]
    )
  )
  cache = decode.init_cache(decoder, 2)
  chunks = [(0, p)] + [(t, t + 1) for t in range(p, tokens.shape[1])]  # prefill, then 1 by 1
  for start, stop in chunks:
    positions = jnp.broadcast_to(jnp.arange(start, stop), (2, stop - start))
    logits, mutated = step(cache, tokens[:, start:stop], positions)
    cache = mutated["cache"]
    # Same fp32 ops on the same values, only the masked key count differs.
    chex.assert_trees_all_close(logits, full[:, start:stop], atol=1e-5, rtol=1e-5)


def test_bf16_policy_generates_with_a_bf16_cache():
  bf16 = make_precision("bf16")
  _, params = _params(LLAMA)  # fp32 parameters, as the bf16 preset keeps them
  cache = decode.init_cache(TransformerLM(LLAMA, bf16, decode=True), 2)
  for path, leaf in jax.tree_util.tree_leaves_with_path(cache):
    expected = jnp.int32 if "index" in jax.tree_util.keystr(path) else jnp.bfloat16
    chex.assert_type(leaf, expected)
  out = gen.generate(LLAMA, bf16, params, _tokens(2, 4), 8, jax.random.key(0), top_k=10)
  chex.assert_shape(out, (2, 12))
  assert int(out.min()) >= 0 and int(out.max()) < LLAMA.vocab_size


def _after_eos(tokens, p, eos):
  """``tokens [B, P + N]`` with each row's new tokens after its first ``eos`` set to ``eos``."""
  new = tokens[:, p:]
  seen = np.cumsum(new == eos, axis=1) > 0  # at or after the first eos
  return np.concatenate([tokens[:, :p], np.where(seen, eos, new)], axis=1)


@pytest.mark.parametrize(
  "temperature,rows",
  [
    (1.0, _tokens(2, 4)),  # rows end at different steps, or never
    (0.0, jnp.tile(_tokens(1, 4), (2, 1))),  # both rows end together: the loop stops early
  ],
)
@pytest.mark.slow
def test_rows_emit_only_eos_after_eos(temperature, rows):
  _, params = _params(GPT2)
  run = lambda eos: gen.generate(
    GPT2, FP32, params, rows, 12, jax.random.key(3), temperature=temperature, eos_id=eos
  )
  free = np.asarray(run(None))
  eos = int(free[0, 4 + 2])  # row 0 emits it by step 2
  out = np.asarray(run(eos))
  np.testing.assert_array_equal(out, _after_eos(free, 4, eos))
  assert (out[0, 4 + 2 :] == eos).all()


def test_sampling_is_reproducible_and_depends_on_the_key():
  _, params = _params(GPT2)
  run = lambda seed: gen.generate(GPT2, FP32, params, _tokens(2, 3), 15, jax.random.key(seed))
  np.testing.assert_array_equal(run(0), run(0))
  assert not np.array_equal(run(0), run(1))


def test_second_call_with_the_same_shapes_does_not_recompile():
  _, params = _params(GPT2)
  call = lambda seed: gen.generate(
    GPT2, FP32, params, _tokens(3, 7, seed=seed), 5, jax.random.key(seed), top_p=0.9
  )
  call(0)
  size = gen._decode._cache_size()  # pylint: disable=protected-access
  call(1)  # new prompt values and key
  assert gen._decode._cache_size() == size  # pylint: disable=protected-access


@pytest.mark.slow
def test_generate_text_continues_a_string_prompt():
  cfg = dataclasses.replace(GPT2, vocab_size=ByteTokenizer.vocab_size)
  _, params = _params(cfg)
  tok = ByteTokenizer()
  ids = jnp.asarray([[tok.bos_id, *tok.encode("ab")]])
  greedy = gen.generate(cfg, FP32, params, ids, 10, jax.random.key(0), temperature=0.0)
  new = [int(t) for t in greedy[0, 3:]]
  expected = tok.decode(new[: new.index(tok.eos_id)] if tok.eos_id in new else new)
  assert gen.generate_text(cfg, FP32, params, tok, "ab", 10, temperature=0.0) == expected
  assert isinstance(gen.generate_text(cfg, FP32, params, tok, "", 10, seed=1), str)  # bos only


def test_prompts_start_with_bos_for_our_own_tokenizers(tmp_path):
  """The byte tokenizer and our own BPE (trained, or saved and loaded) keep BOS first."""
  bpe = BpeTokenizer.train(["hello world, hello there"] * 4, 300)
  bpe.save(str(tmp_path))
  for tok in (ByteTokenizer(), bpe, load_tokenizer(str(tmp_path))):
    assert tok.add_bos and gen.encode_prompt(tok, "hi") == [tok.bos_id, *tok.encode("hi")]


def test_decoder_beam_search_is_exact_when_the_beam_holds_the_vocabulary():
  """Beam search on a decoder-only model (its scanned cache reordered by beam): with
  W = V beams, two new tokens are searched exhaustively, so the result is the most
  likely continuation by the full forward pass."""
  cfg = CONFIGS["llama_scan"]
  model, params = _params(cfg)
  params = jax.tree.map(lambda x: 4 * x, params)  # sharp logits: clear winners
  p, v = 5, cfg.vocab_size
  prompt = _tokens(2, p)
  out = gen.generate(
    cfg, FP32, params, prompt, 2, jax.random.key(0), 0.0, beam_size=v, length_penalty=0.0
  )
  chex.assert_shape(out, (2, p + 2))
  np.testing.assert_array_equal(out[:, :p], prompt)
  first = jnp.tile(jnp.arange(v), 2)  # (2V,): every first token after each prompt
  cand = jnp.concatenate([jnp.repeat(prompt, v, axis=0), first[:, None]], axis=1)
  logp = jax.nn.log_softmax(jax.jit(model.apply)({"params": params}, cand), axis=-1)
  total = logp[jnp.arange(2 * v), p - 1, first].reshape(2, v, 1) + logp[:, p].reshape(2, v, v)
  best = np.asarray(total.reshape(2, -1).argmax(-1))
  np.testing.assert_array_equal(out[:, p:], np.stack([best // v, best % v], axis=-1))


def test_generation_builds_through_the_builder(monkeypatch):
  """The decoding model has model.attention_impl="auto" resolved, as training's."""
  auto = dataclasses.replace(LLAMA, attention_impl="auto")
  assert build_resolved_model(auto, FP32, decode=True).config.attention_impl == "xla"
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  bf16 = make_precision("bf16")
  model = build_resolved_model(auto, bf16, decode=True)
  assert model.decode and model.config.attention_impl == "cudnn"


def test_top_k_1_and_temperature_0_are_argmax():
  logits = jax.random.normal(jax.random.key(0), (64, 50)) * 3
  argmax = jnp.argmax(logits, axis=-1)
  for seed in range(3):
    key = jax.random.key(seed)
    np.testing.assert_array_equal(decode.sample_logits(logits, key, top_k=1), argmax)
    np.testing.assert_array_equal(
      decode.sample_logits(logits, key, 5.0, top_k=1, top_p=0.9), argmax
    )
    np.testing.assert_array_equal(decode.sample_logits(logits, key, 0.0, top_p=0.1), argmax)
  chex.assert_type(decode.sample_logits(logits.astype(jnp.bfloat16), jax.random.key(0)), jnp.int32)


# Token probabilities in shuffled id order; by rank: id 3 (.4), 1 (.3), 4 (.15), 2 (.1), 0 (.05).
PROBS = np.array([0.05, 0.3, 0.1, 0.4, 0.15])


@pytest.mark.parametrize(
  "temperature,top_k,top_p,kept",
  [
    (1.0, None, None, [0, 1, 2, 3, 4]),
    (1.0, 2, None, [1, 3]),
    (1.0, None, 0.3, [3]),  # .4 alone reaches .3
    (1.0, None, 0.5, [1, 3]),  # .4 < .5 <= .7
    (1.0, None, 0.8, [1, 3, 4]),  # .7 < .8 <= .85
    (1.0, 3, 0.8, [1, 3]),  # after top-3, (.4 + .3) / .85 = .82 >= .8
    (0.5, None, 0.8, [1, 3]),  # probs^2 renormalised: .56 + .32 >= .8
    (2.0, 4, None, [1, 2, 3, 4]),
  ],
)
def test_sampled_frequencies_match_the_truncated_distribution(temperature, top_k, top_p, kept):
  n = 4000
  logits = jnp.broadcast_to(jnp.log(jnp.asarray(PROBS, jnp.float32)), (n, PROBS.size))
  draws = np.asarray(decode.sample_logits(logits, jax.random.key(7), temperature, top_k, top_p))
  counts = np.bincount(draws, minlength=PROBS.size)
  expected = np.zeros_like(PROBS)
  expected[kept] = PROBS[kept] ** (1 / temperature)
  expected /= expected.sum()
  assert counts[expected == 0].sum() == 0  # truncated tokens are never drawn
  # 5 binomial standard deviations: a false alarm about once in 10^6 checks.
  tol = 5 * np.sqrt(expected * (1 - expected) / n)
  np.testing.assert_array_less(np.abs(counts / n - expected), tol + 1e-12)


@pytest.mark.parametrize(
  "kw,match",
  [
    (dict(temperature=-1.0), "temperature=-1.0"),
    (dict(top_k=0), "top_k=0"),
    (dict(top_p=0.0), "top_p=0.0"),
    (dict(top_p=1.5), "top_p=1.5"),
  ],
)
def test_bad_sampling_settings_are_rejected(kw, match):
  with pytest.raises(ValueError, match=match):
    decode.sample_logits(jnp.zeros((1, 5)), jax.random.key(0), **kw)


def test_prompt_plus_new_tokens_longer_than_max_len_is_rejected():
  _, params = _params(GPT2)
  with pytest.raises(ValueError, match=r"20 \+ max_new_tokens=10 = 30.*model.max_len=24"):
    gen.generate(GPT2, FP32, params, _tokens(1, 20), 10, jax.random.key(0))


@pytest.mark.parametrize("shape", [(2, 0), (5,)])
def test_empty_or_flat_prompt_is_rejected(shape):
  _, params = _params(GPT2)
  with pytest.raises(ValueError, match="prompt"):
    gen.generate(GPT2, FP32, params, jnp.zeros(shape, jnp.int32), 4, jax.random.key(0))


def test_zero_new_tokens_is_rejected():
  _, params = _params(GPT2)
  with pytest.raises(ValueError, match="max_new_tokens=0"):
    gen.generate(GPT2, FP32, params, _tokens(1, 3), 0, jax.random.key(0))
