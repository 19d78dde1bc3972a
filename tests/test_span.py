"""The ``span`` task (extractive QA): its loss, its fp32 logits, the windows and
offsets that map a predicted span back to the context's characters, and a tiny
encoder that learns to find a marked span."""

from __future__ import annotations

import json

import chex
import compiled
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_mp.config import apply_overrides
from llm_mp.data import ByteTokenizer, squad
from llm_mp.data.tokenizer import BpeTokenizer
from llm_mp.models import build_model
from llm_mp.models.transformer import embed_tokens
from llm_mp.precision import make_precision
from llm_mp.presets import get_preset
from llm_mp.rundir import load_run
from llm_mp.tasks import span
from llm_mp.text_metrics import squad_em_f1
from llm_mp.train import train

SMALL = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.dropout=0.0"]


def _model(policy: str = "fp32", seq_len: int = 16):
  config = apply_overrides(
    get_preset("encoder_tiny"), [*SMALL, "train.task=span", f"data.seq_len={seq_len}"]
  )
  model = build_model(config.model, make_precision(policy), head="span")
  params = compiled.init(model, jax.random.key(0), jnp.zeros((2, seq_len), jnp.int32))
  return model, params


def test_the_loss_on_a_hand_built_row_is_its_closed_form():
  model, variables = _model()
  rng = np.random.default_rng(0)
  inputs = rng.integers(0, 256, (2, 16)).astype(np.int32)
  context = np.zeros((2, 16), np.int32)
  context[:, 5:14] = 1  # question at 0..3, separator at 4, context at 5..13, separator at 14
  batch = {
    "inputs": inputs,
    "segment_ids": np.ones((2, 16), np.int32),
    "positions": np.tile(np.arange(16, dtype=np.int32), (2, 1)),
    "context": context,
    "starts": np.array([6, -1], np.int32),  # the second row is padding: not counted
    "ends": np.array([9, -1], np.int32),
  }
  loss, aux = span.span_loss(model, variables, batch, None)
  logits = np.asarray(compiled.apply(model, variables, inputs, batch["segment_ids"]), np.float64)[0]

  def nll(column, gold):  # -log softmax over the context tokens only
    z = logits[5:14, column]
    return np.log(np.exp(z - z.max()).sum()) + z.max() - logits[gold, column]

  want = (nll(0, 6) + nll(1, 9)) / 2
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)  # fp32 vs float64 sums of 9 terms
  assert float(aux["weight"]) == 1.0 and float(aux["loss"]) == float(loss)


@pytest.mark.parametrize("policy", ["bf16", "fp16"])
def test_start_and_end_probabilities_are_fp32_under_half_precision(policy):
  model, variables = _model(policy)
  tokens = jnp.ones((2, 16), jnp.int32)
  logits = compiled.apply(model, variables, tokens, jnp.ones_like(tokens))
  chex.assert_shape(logits, (2, 16, 2))
  chex.assert_type(logits, jnp.float32)  # the span_head override
  start, end = span.span_logits(logits, jnp.ones_like(tokens))
  for p in (jax.nn.softmax(start), jax.nn.softmax(end)):
    chex.assert_type(p, jnp.float32)
    np.testing.assert_allclose(np.asarray(p.sum(-1)), 1.0, rtol=1e-6)


def _bpe():
  texts = ["the river flows past the old mill and the café by the bridge"] * 4
  return BpeTokenizer.train(texts, 300)


def _peaked_logits(tokenizer, context, answer_start, answer_end):
  """A stand-in model: high start/end logits where the answer's context tokens appear
  whole in a row, so only windows holding the whole answer can win."""
  ids, offsets = tokenizer.encode_offsets(context)
  first, last = squad.answer_tokens(offsets, answer_start, answer_end)
  piece = ids[first : last + 1]

  def logits_fn(batch):
    out = np.zeros((*batch["inputs"].shape, 2), np.float32)
    for r, row in enumerate(batch["inputs"].tolist()):
      for p in range(len(row) - len(piece) + 1):
        if row[p : p + len(piece)] == piece:
          out[r, p, 0] = out[r, p + len(piece) - 1, 1] = 10.0
    return out

  return logits_fn


@pytest.mark.parametrize("make_tokenizer", [ByteTokenizer, _bpe], ids=["byte", "bpe"])
def test_offsets_map_spans_back_to_the_exact_characters_across_windows(make_tokenizer):
  tok = make_tokenizer()
  context = "the old mill stands by the river; the café opens at noon, after the bridge."
  for answer in ("old mill", "café", "the bridge", "noon"):
    start = context.index(answer)
    # Rows of 24 tokens: the later answers only fit whole in a later window.
    wins = squad.encode_windows(tok, "where?", context, seq_len=24, doc_stride=5)
    assert len(wins.inputs) > 2
    got = span.extract_spans(
      _peaked_logits(tok, context, start, start + len(answer)),
      tok,
      ["where?"],
      [context],
      seq_len=24,
      doc_stride=5,
      max_answer_len=10,
      batch_size=4,
    )
    assert context[slice(*got[0])] == answer and got[0][0] == start


def test_training_rows_point_at_the_answer_in_every_window_that_holds_it():
  tok = ByteTokenizer()
  context = "abcdefghij klmnopqrst uvwxyz"
  ex = squad.SpanExample("q?", context, ("klmno",), (context.index("klmno"),))
  rows = squad.encode_examples([ex], tok, seq_len=16, doc_stride=3)
  assert len(rows) >= 2  # several 11-byte windows hold the 5-byte answer
  for r in range(len(rows)):
    s, e = rows["starts"][r], rows["ends"][r]
    assert tok.decode(rows["inputs"][r, s : e + 1]) == "klmno"
    assert rows["context"][r, s] == rows["context"][r, e] == 1


def test_the_match_feature_marks_exactly_the_context_tokens_of_question_words():
  question, context = "Where is the Mill?", "The old mill stands by the river; millstone."
  # Byte tokens: one per character. "The"/"the" and "mill" are question words (case
  # ignored); "millstone" and "stands" are other words; spaces belong to no word.
  want = "111" + "0" * 5 + "1111" + "0" * 11 + "111" + "0" * 18
  wins = squad.encode_windows(ByteTokenizer(), question, context, seq_len=96, doc_stride=8)
  assert len(wins.inputs) == 1
  assert "".join(map(str, wins.match[0][wins.context[0] == 1])) == want
  assert (wins.match[0][wins.context[0] == 0] == 0).all()  # never on the question or padding
  # Multi-character tokens (BPE's " mill" carries its space): marked when they overlap a word.
  offsets = [(0, 3), (3, 7), (7, 12), (12, 19), (33, 38), (38, 43)]
  assert squad.word_match(question, context, offsets).tolist() == [1, 0, 1, 0, 0, 0]
  rows = squad.encode_examples(
    [squad.SpanExample(question, context, ("old mill",), (4,))], ByteTokenizer(), 96, 8
  )
  np.testing.assert_array_equal(rows["match"][0], wins.match[0])


def test_the_encoder_adds_the_match_types_only_with_n_token_types():
  tokens = jnp.arange(32, dtype=jnp.int32).reshape(2, 16) % 200
  ones = jnp.ones_like(tokens)
  for n_types in (0, 2):
    config = apply_overrides(
      get_preset("encoder_tiny"), [*SMALL, "train.task=span", f"model.n_token_types={n_types}"]
    )
    model = build_model(config.model, make_precision("fp32"), head="span")
    variables = model.init(jax.random.key(0), tokens)
    assert ("type_embed" in variables["params"]) == (n_types > 0)
    plain, zeros, matched = (
      model.apply(variables, tokens, types=t) for t in (None, jnp.zeros_like(tokens), ones)
    )
    np.testing.assert_array_equal(plain, zeros)  # no types: type 0 everywhere
    assert (np.abs(np.asarray(matched - plain)).max() > 0) == (n_types > 0)


def test_the_type_embedding_is_added_before_dropout():
  """As in BERT, dropout drops the sum of the token, position and type embeddings: a
  dropped entry is 0 (added after dropout, it would hold the type embedding's value)."""
  config = apply_overrides(
    get_preset("encoder_tiny"), [*SMALL, "model.n_token_types=2", "model.dropout=0.5"]
  )
  tokens = jnp.arange(32, dtype=jnp.int32).reshape(2, 16) % 200
  positions = jnp.broadcast_to(jnp.arange(16), tokens.shape)

  class Embedding(nn.Module):
    @nn.compact
    def __call__(self, tokens, types):
      precision = make_precision("fp32")
      return embed_tokens(self, config.model, precision, tokens, positions, False, types)[0]

  ones = jnp.ones_like(tokens)
  variables = Embedding().init(
    {"params": jax.random.key(0), "dropout": jax.random.key(1)}, tokens, ones
  )
  assert "type_embed" in variables["params"]
  x = Embedding().apply(variables, tokens, ones, rngs={"dropout": jax.random.key(2)})
  assert 0.4 < float(jnp.mean(x == 0)) < 0.6
  with pytest.raises(ValueError, match="model.n_token_types=2 is read by model.family='encoder'"):
    apply_overrides(get_preset("tiny"), ["model.n_token_types=2"])  # a decoder has no types


def test_best_span_keeps_start_before_end_within_the_maximum_length():
  start = np.array([0.0, 5.0, 0.0, 0.0, 9.0])
  end = np.array([8.0, 0.0, 0.0, 4.0, 0.0])  # end 0 is best alone, but before every good start
  assert span.best_span(start, end, max_len=3)[:2] == (1, 3)
  assert span.best_span(start, end, max_len=2)[:2] == (4, 4)


WORDS = "ant bee cat dog eel fox gnu hen ibis jay kiwi lark mole newt owl pig".split()


def _marked_squad(path, n: int, seed: int) -> list[tuple[str, str, str]]:
  """Contexts of random words; the answer is the word after the marker "zz"."""
  rng = np.random.default_rng(seed)
  out, paragraphs = [], []
  for _ in range(n):
    words = list(rng.choice(WORDS, 8))
    k = int(rng.integers(0, 7))
    words.insert(k, "zz")
    context = " ".join(words)
    answer = words[k + 1]
    at = context.index("zz ") + 3
    out.append(("which word follows the marker?", context, answer))
    qa = {"question": out[-1][0], "answers": [{"text": answer, "answer_start": at}]}
    paragraphs.append({"context": context, "qas": [qa]})
  path.write_text(json.dumps({"data": [{"title": "t", "paragraphs": paragraphs}]}))
  return out


@pytest.mark.slow
def test_a_tiny_encoder_learns_to_find_a_marked_span(tmp_path):
  _marked_squad(tmp_path / "train.json", 512, 0)
  dev = _marked_squad(tmp_path / "dev.json", 64, 1)
  config = apply_overrides(
    get_preset("encoder_tiny"),
    [
      *SMALL,
      "model.n_layers=2",
      "model.max_len=64",
      "train.task=span",
      f"data.paths={tmp_path / 'train.json'}",
      f"data.val_paths={tmp_path / 'dev.json'}",
      "data.seq_len=64",
      "train.steps=150",
      "train.batch_size=32",
      "train.eval_every=150",
      "train.ckpt_every=150",
      "train.log_every=50",
      "train.sample_tokens=0",
      "optim.lr=3e-3",
      "optim.warmup_steps=10",
    ],
  )
  train(config, str(tmp_path / "run"), verbose=False)
  run = load_run(str(tmp_path / "run"))
  answers = span.SPEC.predict(run, [f"{q}\t{c}" for q, c, _ in dev])
  em = squad_em_f1(answers, [[a] for _, _, a in dev])["exact_match"]
  assert em >= 90.0, list(zip(answers, dev))[:5]
