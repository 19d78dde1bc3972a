"""Hugging Face import/export: logit and greedy parity with transformers, exact round trips.

The references under tests/fixtures/hf/ were written by tests/make_hf_fixtures.py
with torch + transformers (fp32 CPU); these tests need only numpy and llm_mp.
"""

from __future__ import annotations

import json
import os
import shutil

import compiled
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_mp import cli, hf, inference
from llm_mp.config import ModelConfig
from llm_mp.data import load_tokenizer
from llm_mp.generate import encode_prompt, generate, generate_text
from llm_mp.models import build_model
from llm_mp.models.layers import rope_frequencies
from llm_mp.precision import make_precision

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
NAMES = ("gpt2", "llama_gqa", "llama_tied", "qwen2")
FP32 = make_precision("fp32")


def _fixture(name):
  return os.path.join(FIXTURES, name)


@pytest.fixture(scope="module", params=NAMES)
def imported(request):
  return request.param, hf.import_hf(_fixture(request.param))


def test_configs_cover_the_architectures():
  """What each fixture exercises (so a fixture change cannot silently drop a case)."""
  c = {n: hf.import_hf(_fixture(n))[0].model for n in NAMES}
  assert c["gpt2"].norm == "layernorm" and c["gpt2"].position == "learned"
  assert c["gpt2"].tie_embeddings and c["gpt2"].mlp == "gelu"
  g = c["llama_gqa"]
  assert (g.kv_heads, g.n_heads, g.head_dim, g.d_model) == (2, 4, 16, 32)
  assert not g.tie_embeddings and g.bias("qkv") and g.bias("attn_out") and g.bias("mlp")
  assert (g.rope_scaling, g.rope_factor, g.rope_original_max_len) == ("llama3", 4.0, 16)
  t = c["llama_tied"]
  assert t.tie_embeddings and (t.rope_scaling, t.rope_factor) == ("linear", 2.0)
  assert os.path.isfile(os.path.join(_fixture("llama_tied"), hf.INDEX_FILE))  # sharded
  q = c["qwen2"]
  assert q.bias("qkv") and not q.bias("attn_out") and not q.bias("mlp") and q.kv_heads == 1


@pytest.mark.slow
def test_logits_match_transformers(imported):
  name, (config, params, _) = imported
  tokens = np.load(os.path.join(_fixture(name), "tokens.npy"))
  ref = np.load(os.path.join(_fixture(name), "logits.npy"))
  logits = np.asarray(compiled.apply(build_model(config.model, FP32), {"params": params}, tokens))
  assert logits.dtype == np.float32 and logits.shape == ref.shape
  # fp32 on both sides; summation order differs (measured max 5e-6 on these fixtures).
  np.testing.assert_allclose(logits, ref, atol=1e-4, rtol=0)
  np.testing.assert_array_equal(logits.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.slow
def test_imported_run_generates_as_transformers(name, tmp_path):
  """An imported run encodes a prompt as the checkpoint's tokenizer does with special
  tokens on (these post-processors add no BOS, as GPT-2's and Qwen2's) and its greedy
  generation equals transformers' from the same prompt ids."""
  run = str(tmp_path / "run")
  assert cli.main(["import-hf", _fixture(name), "--workdir", run]) == 0
  loaded = inference.load_run(run)
  model, tok = loaded.config.model, loaded.tokenizer
  assert not tok.add_bos
  text = "The quick brown fox"
  ids = tok.hf.encode(text, add_special_tokens=True).ids
  assert encode_prompt(tok, text) == ids
  assert encode_prompt(tok, "") == [tok.bos_id]  # transformers' start without input ids
  prompt = np.load(os.path.join(_fixture(name), "prompt.npy"))
  ref = np.load(os.path.join(_fixture(name), "greedy.npy"))
  greedy = lambda p, n, **kw: generate(
    model, loaded.precision, loaded.params, jnp.asarray(p), n, jax.random.key(0), 0.0, **kw
  )
  np.testing.assert_array_equal(np.asarray(greedy(prompt, 32)), ref)
  # The text path continues exactly those ids (up to the first eos).
  new = np.asarray(greedy([ids], 8, eos_id=tok.eos_id))[0, len(ids) :].tolist()
  new = new[: new.index(tok.eos_id)] if tok.eos_id in new else new
  got = generate_text(model, loaded.precision, loaded.params, tok, text, 8, temperature=0.0)
  assert got == tok.decode(new)


def test_a_bos_template_puts_bos_before_the_prompt(tmp_path):
  """A LLaMA-style post-processor (TemplateProcessing "<s> $A") makes prompts start
  with BOS, in memory and in the imported run's tokenizer file."""
  src, run = str(tmp_path / "src"), str(tmp_path / "run")
  shutil.copytree(_fixture("llama_gqa"), src)
  path = os.path.join(src, "tokenizer.json")
  with open(path, encoding="utf-8") as f:
    spec = json.load(f)
  bos = "<|endoftext|>"
  spec["post_processor"] = {
    "type": "TemplateProcessing",
    "single": [
      {"SpecialToken": {"id": bos, "type_id": 0}},
      {"Sequence": {"id": "A", "type_id": 0}},
    ],
    "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
    "special_tokens": {bos: {"id": bos, "ids": [0], "tokens": [bos]}},
  }
  with open(path, "w", encoding="utf-8") as f:
    json.dump(spec, f)
  assert cli.main(["import-hf", src, "--workdir", run]) == 0
  for tok in (hf.import_hf(src)[2], load_tokenizer(run)):
    assert tok.add_bos and tok.bos_id == 0
    ids = tok.hf.encode("The quick", add_special_tokens=True).ids
    assert ids[0] == 0 and encode_prompt(tok, "The quick") == ids


def test_export_then_import_is_bit_exact(imported, tmp_path):
  name, (config, params, tokenizer) = imported
  out = str(tmp_path / "out")
  hf.export_hf((config, params, tokenizer), out)
  config2, params2, tokenizer2 = hf.import_hf(out)
  assert config2.model == config.model
  jax.tree.map(
    lambda a, b: np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32)),
    params,
    params2,
  )
  assert tokenizer2.to_json() == tokenizer.to_json()
  # The exported tensors equal the fixture's own, name for name (the HF layout is kept).
  ours, _ = hf.read_weights(out)
  theirs, _ = hf.read_weights(_fixture(name))
  theirs.pop("lm_head.weight", None) if config.model.tie_embeddings else None
  assert sorted(ours) == sorted(theirs)
  for k in ours:
    np.testing.assert_array_equal(ours[k], theirs[k])


def test_tokenizer_keeps_its_specials_and_round_trips_unicode(imported):
  _, (_, _, tokenizer) = imported
  eot = tokenizer.hf.token_to_id("<|endoftext|>")
  # GPT-2 style: one special is bos and eos; no pad in the file, so pad = eos.
  assert tokenizer.bos_id == tokenizer.eos_id == tokenizer.pad_id == eot == 0
  for text in ("Grüße, 東京 🙂 naïve\n\ttabs", "a<|endoftext|>b", ""):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
  assert eot not in tokenizer.encode("a<|endoftext|>b")  # literal text, not the special


def test_tokenizer_specials_from_config_ids(tmp_path):
  """Without tokenizer_config.json the ids come from config.json's bos/eos_token_id."""
  src = str(tmp_path / "src")
  shutil.copytree(_fixture("gpt2"), src)
  os.remove(os.path.join(src, "tokenizer_config.json"))
  _, _, tok = hf.import_hf(src)
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 0, 0)


def test_rope_llama3_frequencies_by_hand():
  """llama3 scaling: long wavelengths / factor, short ones kept, the middle blended."""
  # head_dim 8, theta 100: freqs 1, 100^-1/4, 100^-1/2, 100^-3/4; wavelengths 2pi/f.
  base = 100.0 ** -(np.arange(4) / 4)
  f = rope_frequencies(
    8, 100.0, "llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_len=32
  )
  wavelen = 2 * np.pi / base  # 6.3, 19.9, 62.8, 198.7: kept below 32/4, scaled above 32/1
  smooth = (32 / wavelen[1] - 1) / 3
  want = [base[0], (1 - smooth) * base[1] / 4 + smooth * base[1], base[2] / 4, base[3] / 4]
  np.testing.assert_allclose(f, want, rtol=1e-6)  # fp32 arithmetic
  np.testing.assert_allclose(rope_frequencies(8, 100.0, "linear", factor=2.0), base / 2, rtol=1e-6)


def test_defaults_keep_todays_models():
  c = ModelConfig()
  assert c.head_dim == c.d_model // c.n_heads and c.rope_scaling == "none"
  assert all(c.bias(p) for p in ("qkv", "attn_out", "mlp"))
  assert not any(ModelConfig.llama().bias(p) for p in ("qkv", "attn_out", "mlp"))


def test_gelu_exact_is_erf_gelu():
  from math import erf  # pylint: disable=import-outside-toplevel

  from llm_mp.models.layers import ACTIVATIONS  # pylint: disable=import-outside-toplevel

  x = np.array([-3.0, -0.5, 0.0, 0.7, 2.5])
  want = [v * 0.5 * (1 + erf(v / np.sqrt(2))) for v in x]
  np.testing.assert_allclose(ACTIVATIONS["gelu_exact"](jnp.asarray(x)), want, rtol=1e-6)


def _broken(tmp_path, edit):
  src = str(tmp_path / "src")
  shutil.copytree(_fixture("gpt2"), src)
  edit(src)
  return src


def _edit_config(**kw):
  def edit(src):
    path = os.path.join(src, "config.json")
    with open(path, encoding="utf-8") as f:
      cfg = json.load(f)
    cfg.update(kw)
    with open(path, "w", encoding="utf-8") as f:
      json.dump(cfg, f)

  return edit


@pytest.mark.parametrize(
  "edit, message",
  [
    (_edit_config(architectures=["BertForMaskedLM"]), "config.json: field architectures="),
    (_edit_config(n_embd=64), "transformer.wte.weight has shape [320, 32] but config.json"),
    (_edit_config(activation_function="swish"), "config.json: field activation_function="),
    (lambda s: os.remove(os.path.join(s, "model.safetensors")), "model.safetensors: file not"),
    (lambda s: os.remove(os.path.join(s, "tokenizer.json")), "tokenizer.json: file not found"),
    (_edit_config(n_layer=3), "tensor transformer.h.2.attn.c_attn.weight is missing"),
  ],
)
def test_bad_checkpoints_are_one_line_errors(tmp_path, edit, message):
  src = _broken(tmp_path, edit)
  with pytest.raises(hf.HFError, match=None) as e:
    hf.import_hf(src)
  assert message in str(e.value) and "\n" not in str(e.value)


def test_bad_dtype_names_file_and_tensor(tmp_path):
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel

  def edit(src):
    path = os.path.join(src, "model.safetensors")
    tensors, _ = hf.read_weights(src)
    tensors["transformer.ln_f.bias"] = tensors["transformer.ln_f.bias"].astype(np.int32)
    save_file(tensors, path)

  with pytest.raises(
    hf.HFError,
    match=r"model.safetensors: tensor transformer.ln_f.bias has "
    r"dtype I32",
  ):
    hf.import_hf(_broken(tmp_path, edit))


def test_bf16_checkpoint_imports_exactly(tmp_path):
  """bf16 tensors (read without safetensors.numpy, which lacks bf16) widen exactly."""
  import ml_dtypes  # pylint: disable=import-outside-toplevel
  from safetensors import numpy as stnp  # pylint: disable=import-outside-toplevel

  src = str(tmp_path / "src")
  shutil.copytree(_fixture("gpt2"), src)
  tensors, _ = hf.read_weights(src)
  half = {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}
  # Write the bf16 file by hand: safetensors' numpy API rejects ml_dtypes arrays.
  blob = stnp.save({k: v.view(np.uint16) for k, v in half.items()})
  n = int.from_bytes(blob[:8], "little")
  header = json.loads(blob[8 : 8 + n])
  for k in half:
    header[k]["dtype"] = "BF16"
  text = json.dumps(header).encode()
  with open(os.path.join(src, "model.safetensors"), "wb") as f:
    f.write(len(text).to_bytes(8, "little") + text + blob[8 + n :])
  _, params, _ = hf.import_hf(src)
  np.testing.assert_array_equal(
    params["embed"]["embedding"], half["transformer.wte.weight"].astype(np.float32)
  )


def test_export_refuses_what_hf_cannot_load(tmp_path):
  config, params, tok = hf.import_hf(_fixture("gpt2"))
  moe = config.model.__class__(**{**config.model.__dict__, "n_experts": 2})
  with pytest.raises(hf.HFError, match="no Hugging Face architecture matches"):
    hf.export_hf((moe, params, tok), str(tmp_path / "out"))
  assert not os.path.exists(tmp_path / "out")
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "x").write_text("x")
  with pytest.raises(ValueError, match="already exists and is not empty"):
    hf.export_hf((config, params, tok), str(tmp_path / "full"))


def test_a_byte_tokenizer_run_exports_with_the_same_ids(tmp_path):
  """Bytes export as a byte-level BPE with no merges: HF encodes text (BOS first with
  special tokens on) to the ids the run was trained on, and the import's logits equal."""
  from tokenizers import Tokenizer as HFTokenizer  # pylint: disable=import-outside-toplevel

  from llm_mp.data import ByteTokenizer  # pylint: disable=import-outside-toplevel

  config, _, _ = hf.import_hf(_fixture("gpt2"))
  byte = ByteTokenizer()
  model_config = config.model.__class__(**{**config.model.__dict__, "vocab_size": byte.vocab_size})
  model = build_model(model_config, FP32)
  ids = jnp.asarray([[byte.bos_id, *byte.encode("Grüße 🙂")]])
  params = nn.unbox(model.init(jax.random.key(0), ids)["params"])
  out = str(tmp_path / "out")
  hf.export_hf((model_config, params, byte), out)
  text = "Grüße, 東京 🙂\x00\t"
  theirs = HFTokenizer.from_file(os.path.join(out, "tokenizer.json"))
  assert theirs.encode(text).ids == [byte.bos_id, *byte.encode(text)]
  assert theirs.decode(theirs.encode(text).ids, skip_special_tokens=True) == text
  config2, params2, tokenizer2 = hf.import_hf(out)
  assert (tokenizer2.pad_id, tokenizer2.bos_id, tokenizer2.eos_id, tokenizer2.add_bos) == (
    byte.pad_id,
    byte.bos_id,
    byte.eos_id,
    True,
  )
  for t in (text, "a<|bos|>b"):  # specials in the text are text, as in the run
    assert tokenizer2.encode(t) == byte.encode(t)
  np.testing.assert_array_equal(
    build_model(config2.model, FP32).apply({"params": params2}, ids),
    model.apply({"params": params}, ids),
  )


@pytest.mark.slow  # import, train, generate and export through the CLI
def test_cli_import_generate_export(tmp_path, capsys):
  """import-hf writes a run that generate reads; export-hf reproduces the weights."""
  run, out = str(tmp_path / "run"), str(tmp_path / "out")
  assert cli.main(["import-hf", _fixture("llama_gqa"), "--workdir", run]) == 0
  assert sorted(os.listdir(run)) == [
    "checkpoints",
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
  ]
  capsys.readouterr()
  assert (
    cli.main(
      [
        "generate",
        "--workdir",
        run,
        "--prompt",
        "The quick",
        "--max-new-tokens",
        "4",
        "--temperature",
        "0",
      ]
    )
    == 0
  )
  # The step-0 checkpoint holds the imported parameters: same greedy text as in memory.
  config, params, tok = hf.import_hf(_fixture("llama_gqa"))
  want = generate_text(config.model, FP32, params, tok, "The quick", 4, temperature=0.0)
  assert capsys.readouterr().out == "The quick" + want + "\n"
  assert cli.main(["generate", "--workdir", run, "--source", "Ein Mann."]) == 2
  err = capsys.readouterr().err
  assert "model.family='decoder' run" in err and "pass --prompt TEXT, not --source" in err
  assert err.count("\n") == 1
  assert cli.main(["export-hf", "--workdir", run, out]) == 0
  ours, _ = hf.read_weights(out)
  theirs, _ = hf.read_weights(_fixture("llama_gqa"))
  assert sorted(ours) == sorted(theirs)
  for k in ours:
    np.testing.assert_array_equal(ours[k], theirs[k])
  assert cli.main(["import-hf", _fixture("gpt2"), "--workdir", run]) == 2  # not empty
  assert "already exists and is not empty" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa"])  # tied and untied heads
def test_padded_vocabulary_keeps_logits_sampling_and_export(name, tmp_path):
  config, params, tokenizer = hf.import_hf(_fixture(name))
  padded, pparams, _ = hf.import_hf(_fixture(name), vocab_multiple=128)
  v = config.model.vocab_size
  assert padded.model.padded_vocab % 128 == 0 and padded.model.padded_vocab > v
  assert pparams["embed"]["embedding"].shape[0] == padded.model.padded_vocab
  tokens = np.load(os.path.join(_fixture(name), "tokens.npy"))
  ref = np.asarray(build_model(config.model, FP32).apply({"params": params}, tokens))
  out = np.asarray(build_model(padded.model, FP32).apply({"params": pparams}, tokens))
  np.testing.assert_array_equal(out[..., :v], ref)  # the real logits are unchanged
  assert (out[..., v:] <= -1e8).all()  # padded ids are masked: never sampled, no loss mass
  prompt = jnp.asarray(np.load(os.path.join(_fixture(name), "prompt.npy")))
  np.testing.assert_array_equal(
    np.asarray(
      generate(padded.model, FP32, pparams, prompt, 32, jax.random.key(0), temperature=0.0)
    ),
    np.load(os.path.join(_fixture(name), "greedy.npy")),
  )
  hf.export_hf((padded, pparams, tokenizer), str(tmp_path / "out"))  # padding stripped
  ours, _ = hf.read_weights(str(tmp_path / "out"))
  theirs, _ = hf.read_weights(_fixture(name))
  for k in ours:
    np.testing.assert_array_equal(ours[k], theirs[k])


@pytest.mark.slow  # an import and a fine-tuning run per fixture
@pytest.mark.parametrize("name", NAMES)
def test_fine_tuning_an_import_keeps_its_lm_head(name, tmp_path):
  """``--init-from`` an imported checkpoint keeps the pretrained output layer (untied
  LLaMA-family heads included): one step at lr 1e-9 moves no parameter by more than
  Adam's first update (lr) plus fp32 rounding, and the loss stays the imported model's
  (a re-initialised head moves by ~0.1 and puts the loss at the uniform level)."""
  from llm_mp.config import apply_overrides  # pylint: disable=import-outside-toplevel
  from llm_mp.inference import evaluate_run  # pylint: disable=import-outside-toplevel
  from llm_mp.rundir import load_run, write_run  # pylint: disable=import-outside-toplevel
  from llm_mp.train import train  # pylint: disable=import-outside-toplevel

  config, params, tokenizer = hf.import_hf(_fixture(name))
  base, tuned = str(tmp_path / "base"), str(tmp_path / "tuned")
  write_run(base, config, params, tokenizer)
  text = tmp_path / "text.txt"
  text.write_text(
    "\n\n\n".join(f"Paragraph {i}: the quick brown fox jumps. " * 3 for i in range(8))
  )
  fine = apply_overrides(
    config,
    [
      f"train.init_from={base}",
      "train.steps=1",
      "train.batch_size=8",
      "train.sample_tokens=0",
      "optim.lr=1e-9",
      "optim.warmup_steps=0",
      "optim.schedule=constant",
      "optim.weight_decay=0",
      "optim.clip_norm=null",
      f"data.paths={text}",
      "data.val_fraction=0",
    ],
  )
  train(fine, tuned, verbose=False)
  before, after = jax.device_get(load_run(base).params), jax.device_get(load_run(tuned).params)
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), before, after)
  # Adam's first step moves each weight by at most lr; fp32 rounding of weights near 1
  # adds up to one ulp (1.2e-7).
  assert max(jax.tree.leaves(moved)) <= 1e-9 + 1.2e-7, moved
  a, b = evaluate_run(base, [str(text)]), evaluate_run(tuned, [str(text)])
  np.testing.assert_allclose(b["val_loss"], a["val_loss"], atol=1e-5)
