"""The BERT-style encoder and masked-LM corruption: masks, pooling, heads, dtypes, numerics."""

import dataclasses
import functools
import math

import chex
import compiled
import flax.linen as nn
import jax
import jax.numpy as jnp
import jmp
import numpy as np
import pytest

from llm_mp.config import ModelConfig
from llm_mp.data.masking import maskable_tokens, mlm_mask
from llm_mp.models import TransformerEncoder, TransformerLM, pool
from llm_mp.models.encoder import HEAD_PARAMS
from llm_mp.precision import Precision, make_precision
from llm_mp.presets import get_preset

V = 61
BERT = ModelConfig.gpt2(
  family="encoder", vocab_size=V, d_model=32, n_layers=2, n_heads=4, max_len=24, n_classes=3
)
ROPE = ModelConfig.llama(
  family="encoder",
  vocab_size=V,
  d_model=32,
  n_layers=2,
  n_heads=4,
  n_kv_heads=2,
  max_len=24,
  n_classes=3,
)  # untied Dense lm_head
CONFIGS = {"bert": BERT, "rope": ROPE}
# Row 0: 10 real tokens then 6 padding; row 1: two packed documents, no padding.
SEGMENTS = jnp.array([[1] * 10 + [0] * 6, [1] * 7 + [2] * 9])


def _tokens(b=2, t=16, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, V, (b, t)), jnp.int32)


def _init(cfg, head="lm", precision="fp32"):
  model = TransformerEncoder(cfg, make_precision(precision), head=head)
  params = nn.unbox(compiled.init(model, jax.random.key(0), _tokens(), SEGMENTS)["params"])
  return model, params


def _apply(model, params, tokens, segments=None, **kw):
  return compiled.apply(model, {"params": params}, tokens, segments, **kw)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.slow
def test_a_later_token_changes_earlier_outputs_unlike_the_decoder(name):
  cfg = CONFIGS[name]
  tokens = _tokens(b=1)
  changed = tokens.at[0, 9].set((tokens[0, 9] + 1) % V)
  enc, params = _init(cfg)
  diff = np.abs(np.asarray(_apply(enc, params, tokens) - _apply(enc, params, changed)))
  assert (diff[0, :9].max(axis=-1) > 1e-6).all()  # every earlier position sees token 9
  dec = TransformerLM(dataclasses.replace(cfg, family="decoder"), make_precision("fp32"))
  dparams = nn.unbox(compiled.init(dec, jax.random.key(0), tokens)["params"])
  before = compiled.apply(dec, {"params": dparams}, tokens)
  after = compiled.apply(dec, {"params": dparams}, changed)
  np.testing.assert_array_equal(np.asarray(before[:, :9]), np.asarray(after[:, :9]))


@pytest.mark.parametrize(
  "head,pool_kind", [("lm", "first"), ("classify", "first"), ("classify", "mean")]
)
def test_padding_ids_never_change_real_outputs(head, pool_kind):
  cfg = dataclasses.replace(BERT, pool=pool_kind)
  model, params = _init(cfg, head)
  tokens = _tokens()
  other = tokens.at[0, 10:].set((tokens[0, 10:] + 7) % V)  # new ids at row 0's padding
  base, changed = _apply(model, params, tokens, SEGMENTS), _apply(model, params, other, SEGMENTS)
  if head == "lm":
    base, changed = base[0, :10], changed[0, :10]
  # Bit-identical: masked keys get exp(finfo.min - max) = 0 exactly.
  np.testing.assert_array_equal(np.asarray(base), np.asarray(changed))
  # Contrast: without the padding mask the same change does reach the real tokens.
  unmasked = _apply(model, params, tokens)[0], _apply(model, params, other)[0]
  assert np.abs(np.asarray(unmasked[0] - unmasked[1])).max() > 1e-6


def test_packed_documents_do_not_see_each_other():
  model, params = _init(BERT)
  row = _tokens(b=1)
  packed = _apply(
    model, params, row, SEGMENTS[1:], positions=jnp.array([list(range(7)) + list(range(9))])
  )
  chex.assert_trees_all_close(packed[:, :7], _apply(model, params, row[:, :7]), atol=1e-5)
  chex.assert_trees_all_close(packed[:, 7:], _apply(model, params, row[:, 7:]), atol=1e-5)


def test_pool_first_and_mean_by_hand():
  h = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 3)), jnp.bfloat16)
  seg = jnp.array([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0]])  # row 1: all padding
  hf = np.asarray(h, np.float32)
  first = pool(h, seg, "first")
  chex.assert_type(first, jnp.float32)
  np.testing.assert_array_equal(np.asarray(first), hf[:, 0])
  mean = pool(h, seg, "mean")
  chex.assert_type(mean, jnp.float32)
  np.testing.assert_allclose(np.asarray(mean[0]), hf[0, :3].mean(0), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(mean[1]), np.zeros(3))  # not 0/0
  np.testing.assert_allclose(np.asarray(pool(h, None, "mean")), hf.mean(1), rtol=1e-6)
  with pytest.raises(ValueError, match="model.pool='max'"):
    pool(h, seg, "max")


@pytest.mark.parametrize("pool_kind", ["first", "mean"])
def test_classifier_pools_the_final_hidden_states(pool_kind):
  cfg = dataclasses.replace(BERT, pool=pool_kind)
  model, params = _init(cfg, "classify")
  hidden_model = TransformerEncoder(cfg, make_precision("fp32"), head="hidden")
  tokens = _tokens()
  _, state = model.apply({"params": params}, tokens, SEGMENTS, mutable=["intermediates"])
  pooled = np.asarray(state["intermediates"]["pooled"][0])
  hidden = np.asarray(_apply(hidden_model, params, tokens, SEGMENTS))  # backbone params suffice
  if pool_kind == "first":
    np.testing.assert_array_equal(pooled, hidden[:, 0])
  else:
    ref = np.stack([hidden[0, :10].mean(0), hidden[1].mean(0)])  # row 0's padding left out
    np.testing.assert_allclose(pooled, ref, rtol=1e-5, atol=1e-6)  # fp32 sums of <= 16 terms


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16", "pure_bf16"])
@pytest.mark.slow
def test_head_shapes_and_fp32_logits_under_every_policy(precision):
  prec = make_precision(precision)
  tokens = _tokens()
  cls_model, cls_params = _init(BERT, "classify", precision)
  logits = _apply(cls_model, cls_params, tokens, SEGMENTS)
  chex.assert_shape(logits, (2, BERT.n_classes))
  chex.assert_type(logits, jnp.float32)
  chex.assert_tree_all_finite(logits)
  chex.assert_type(cls_params["classifier"]["kernel"], prec.param_dtype)
  lm_model, lm_params = _init(ROPE, "lm", precision)  # untied: a Dense lm_head
  lm_logits = _apply(lm_model, lm_params, tokens, SEGMENTS)
  chex.assert_shape(lm_logits, (2, 16, V))
  chex.assert_type(lm_logits, jnp.float32)
  hidden = _apply(TransformerEncoder(BERT, prec, head="hidden"), cls_params, tokens, SEGMENTS)
  chex.assert_type(hidden, prec.compute_dtype)  # the residual stream stays low precision


def test_bf16_classifier_close_to_fp32():
  model32, params = _init(BERT, "classify")
  # The initial classifier gives logits of ~0.02; x100 brings them to ~2, a trained
  # classifier's scale, so that a relative tolerance means something.
  params = {**params, "classifier": {**params["classifier"]}}
  params["classifier"]["kernel"] = params["classifier"]["kernel"] * 100
  model16 = TransformerEncoder(BERT, make_precision("bf16"), head="classify")
  ref = np.asarray(_apply(model32, params, _tokens(), SEGMENTS))
  out = np.asarray(_apply(model16, params, _tokens(), SEGMENTS))
  assert np.abs(ref).max() > 1.0
  rel = np.abs(out - ref).max() / np.abs(ref).max()
  # Measured 0.37% (bf16 keeps 8 mantissa bits; 0.46-0.62% at other classifier scales).
  # Changing one input token moves these logits by 2.4%, leaving the padding unmasked by 18%.
  assert rel < 0.015, rel
  assert rel > 1e-4, "bf16 logits equal fp32's: the policy did not reach the computation"


@pytest.mark.parametrize(
  "name,head,pool_kind",
  [
    ("bert", "lm", "first"),
    ("rope", "lm", "first"),
    ("bert", "classify", "mean"),
    ("rope", "classify", "first"),
  ],
)
@pytest.mark.slow
def test_fp32_forward_matches_float64_reference(name, head, pool_kind):
  cfg = dataclasses.replace(CONFIGS[name], pool=pool_kind)
  model, params = _init(cfg, head)
  tokens = _tokens()
  out = _apply(model, params, tokens, SEGMENTS)
  with jax.enable_x64(True):
    f64 = Precision("f64", jmp.Policy(jnp.float64, jnp.float64, jnp.float64))
    p64 = jax.tree.map(lambda p: p.astype(jnp.float64), params)
    ref = _apply(TransformerEncoder(cfg, f64, head=head), p64, tokens, SEGMENTS)
    assert ref.dtype == jnp.float64
    # fp32 matmuls over d=32..128 accumulate ~1e-6 relative error per op (as test_model).
    np.testing.assert_allclose(np.asarray(out, np.float64), np.asarray(ref), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("head", ["lm", "classify"])
def test_dropout_only_when_not_deterministic_and_positive(head):
  tokens, key = _tokens(), {"dropout": jax.random.key(1)}
  drop_cfg = dataclasses.replace(BERT, dropout=0.1)
  model, params = _init(drop_cfg, head)
  eval_out = _apply(model, params, tokens, SEGMENTS)
  train_out = _apply(model, params, tokens, SEGMENTS, deterministic=False, rngs=key)
  assert np.abs(np.asarray(eval_out - train_out)).max() > 1e-4
  again = _apply(model, params, tokens, SEGMENTS, deterministic=False, rngs=key)
  np.testing.assert_array_equal(np.asarray(train_out), np.asarray(again))  # a function of the key
  if head == "classify":  # the head's own dropout, between pooler and classifier
    for det, rngs in ((True, {}), (False, key)):
      logits, state = model.apply(
        {"params": params},
        tokens,
        SEGMENTS,
        deterministic=det,
        rngs=rngs,
        capture_intermediates=True,
        mutable=["intermediates"],
      )
      pooled = state["intermediates"]["pooler"]["__call__"][0]
      cls = params["classifier"]
      direct = pooled @ cls["kernel"] + cls["bias"]
      assert np.allclose(logits, direct, atol=1e-6) == det  # fp32 rounding only when equal
  no_drop = TransformerEncoder(BERT, make_precision("fp32"), head=head)  # dropout 0.0
  np.testing.assert_array_equal(
    np.asarray(_apply(no_drop, params, tokens, SEGMENTS)),
    np.asarray(_apply(no_drop, params, tokens, SEGMENTS, deterministic=False, rngs=key)),
  )


def test_unknown_head_and_too_long_input_are_rejected():
  with pytest.raises(ValueError, match="head='pooled'"):
    TransformerEncoder(BERT, make_precision("fp32"), head="pooled").init(
      jax.random.key(0), _tokens()
    )
  with pytest.raises(ValueError, match="model.max_len=24"):
    _init(BERT)[0].init(jax.random.key(0), _tokens(t=25))


def _param_paths(tree):
  return {
    "/".join(str(k.key) for k in path): leaf.shape
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
  }


@pytest.mark.parametrize("preset", ["encoder_tiny", "bert_base"])
def test_presets_build_both_heads_on_one_backbone(preset):
  config = get_preset(preset)
  assert config.model.family == "encoder" and config.train.task == "mlm"
  prec = make_precision(config.precision.policy)
  tokens = jnp.zeros((1, config.data.seq_len), jnp.int32)
  shapes = {
    head: _param_paths(
      nn.unbox(
        jax.eval_shape(
          TransformerEncoder(config.model, prec, head=head).init, jax.random.key(0), tokens
        )["params"]
      )
    )
    for head in ("lm", "classify")
  }

  def is_head(path):
    return path.split("/")[0] in HEAD_PARAMS

  backbone = {k: v for k, v in shapes["lm"].items() if not is_head(k)}
  assert backbone == {k: v for k, v in shapes["classify"].items() if not is_head(k)}
  assert not any(is_head(k) for k in shapes["lm"])  # tied MLM head: no parameters of its own
  c = config.model
  d, f = c.d_model, c.ff_dim
  layer = 4 * (d * d + d) + (d * f + f) + (f * d + d) + 2 * 2 * d  # attn, MLP, 2 LayerNorms
  positions = c.max_len * d if c.position == "learned" else 0  # RoPE has no table
  n_backbone = c.vocab_size * d + positions + c.n_layers * layer + 2 * d
  assert sum(math.prod(s) for s in backbone.values()) == n_backbone
  if preset == "bert_base":  # BERT-base's 110M, less its token-type table and MLM transform
    assert 108e6 < n_backbone < 110e6, n_backbone
  heads = sum(math.prod(s) for k, s in shapes["classify"].items() if is_head(k))
  assert heads == (d * d + d) + (d * c.n_classes + c.n_classes)


def test_maskable_tokens_by_hand():
  inputs = jnp.array([[1, 5, 6, 2, 0, 0], [1, 7, 2, 1, 8, 2]])
  segments = jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 2, 2, 2]])
  got = maskable_tokens(inputs, segments, special_ids=(0, 1, 2))
  want = [[False, True, True, False, False, False], [False, True, False, False, True, False]]
  np.testing.assert_array_equal(np.asarray(got), want)


def test_mlm_mask_statistics_over_many_draws():
  p, mask_id, low, vocab = 0.15, 256, 3, 256  # pad id as [MASK]; random ids in [3, 256)
  rng = np.random.default_rng(0)
  inputs = jnp.asarray(rng.integers(low, vocab, (64, 128)), jnp.int32)
  maskable = jnp.asarray(rng.random((64, 128)) < 0.8)
  fn = jax.jit(
    functools.partial(mlm_mask, probability=p, mask_id=mask_id, vocab_size=vocab, low=low)
  )
  draws = [fn(jax.random.key(i), inputs, maskable) for i in range(16)]
  x, m = np.asarray(inputs), np.asarray(maskable)
  n_maskable = n_selected = n_mask = n_random = n_kept = 0
  for masked, targets in draws:
    chex.assert_type((masked, targets), jnp.int32)
    masked, targets = np.asarray(masked), np.asarray(targets)
    sel = targets >= 0
    assert not (sel & ~m).any()  # non-maskable positions are never selected
    np.testing.assert_array_equal(targets[sel], x[sel])  # targets: the original tokens
    assert (targets[~sel] == -1).all()
    np.testing.assert_array_equal(masked[~sel], x[~sel])  # unselected inputs untouched
    assert ((masked[sel] == mask_id) | ((masked[sel] >= low) & (masked[sel] < vocab))).all()
    n_maskable += m.sum()
    n_selected += sel.sum()
    n_mask += (masked[sel] == mask_id).sum()
    n_kept += (masked[sel] == x[sel]).sum()
    n_random += ((masked[sel] != mask_id) & (masked[sel] != x[sel])).sum()

  def within_binomial(k, n, q):  # 5 sigma: a false failure about once in 3.5 million runs
    return abs(k / n - q) <= 5 * math.sqrt(q * (1 - q) / n)

  assert within_binomial(n_selected, n_maskable, p), n_selected / n_maskable
  # A random replacement equals the original with probability 1/253; then it reads as kept.
  hit = 1 / (vocab - low)
  assert within_binomial(n_mask, n_selected, 0.8), n_mask / n_selected
  assert within_binomial(n_random, n_selected, 0.1 * (1 - hit)), n_random / n_selected
  assert within_binomial(n_kept, n_selected, 0.1 + 0.1 * hit), n_kept / n_selected
  # Different keys give different draws; the same key the same draw.
  assert not np.array_equal(np.asarray(draws[0][1]), np.asarray(draws[1][1]))
  np.testing.assert_array_equal(
    np.asarray(fn(jax.random.key(0), inputs, maskable)[0]), np.asarray(draws[0][0])
  )


def test_mlm_mask_rejects_bad_arguments():
  x, m = jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), bool)
  with pytest.raises(ValueError, match="probability=1.5"):
    mlm_mask(jax.random.key(0), x, m, probability=1.5, mask_id=0, vocab_size=10)
  with pytest.raises(ValueError, match="low=10, vocab_size=10"):
    mlm_mask(jax.random.key(0), x, m, probability=0.15, mask_id=0, vocab_size=10, low=10)
