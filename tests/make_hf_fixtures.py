"""Builds the Hugging Face parity fixtures under tests/fixtures/hf/ (needs torch + transformers).

Run from the repository root, once, when the fixtures must change:

  pip install torch==2.13.0 transformers safetensors
  python tests/make_hf_fixtures.py           # writes tests/fixtures/hf/<name>/
  python tests/make_hf_fixtures.py --check   # also: llm_mp export -> transformers logits

Each fixture is a tiny random-initialised ``transformers`` model saved with
``save_pretrained`` (config.json + model.safetensors, or shards + index) and a
tiny byte-level BPE ``tokenizer.json`` trained with ``tokenizers`` on
``TEXT``, plus the references tests/test_hf.py compares against with
numpy only (CI has no torch):

* ``tokens.npy`` int32 ``[2, 16]`` token ids; ``logits.npy`` float32
  ``[2, 16, vocab]``: the model's fp32 logits on them.
* ``prompt.npy`` int32 ``[1, 5]``; ``greedy.npy`` int32 ``[1, 5 + 32]``:
  ``model.generate(prompt, do_sample=False, max_new_tokens=32)``.

Biases and norm scales are drawn at random (not HF's zeros/ones, which would
hide a misplaced bias) and weights have std 0.2 so that greedy choices are
decided by clear margins (checked here: >= 1e-3 between the top two logits at
every generated step, far above fp32 differences between implementations).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "hf")
EOT = "<|endoftext|>"
TEXT = """The quick brown fox jumps over the lazy dog. Mixed precision training keeps a float32
master copy of the weights and computes in bfloat16 or float16, scaling the loss so that small
gradients survive. Transformers stack attention and feed-forward blocks with residual
connections; rotary position embeddings rotate queries and keys by position-dependent angles.
Grüße aus Köln, naïve café, 東京の天気は晴れです, Здравствуй мир, 🙂 emoji too.
def train_step(state, batch): return state.apply_gradients(grads=grads), metrics
""".splitlines()


def build_tokenizer(vocab_size: int = 320) -> Tokenizer:
  """A byte-level BPE (GPT-2's design) with one special, ``<|endoftext|>`` (id 0)."""
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    special_tokens=[EOT],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  tok.train_from_iterator(TEXT * 4, trainer)
  return tok


def randomise(model: torch.nn.Module, seed: int) -> None:
  """Weights N(0, 0.2); biases N(0, 0.2); norm scales 1 + N(0, 0.2)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g) * 0.2
      is_norm = any(s in name for s in ("ln_", "norm", "layernorm"))
      p.copy_(1.0 + noise if is_norm and name.endswith("weight") else noise)


FIXTURES = {
  # GPT-2: fused c_attn, Conv1D, learned positions, tied head, tanh GELU.
  "gpt2": lambda v, eot: transformers.GPT2Config(
    vocab_size=v,
    n_positions=64,
    n_embd=32,
    n_layer=2,
    n_head=4,
    bos_token_id=eot,
    eos_token_id=eot,
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
  ),
  # LLaMA 3 style: GQA, untied head, head_dim != d / n_heads, attention and MLP biases,
  # llama3 RoPE scaling (original context 16 so that all three frequency bands occur).
  "llama_gqa": lambda v, eot: transformers.LlamaConfig(
    vocab_size=v,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    attention_bias=True,
    mlp_bias=True,
    tie_word_embeddings=False,
    rope_scaling={
      "rope_type": "llama3",
      "factor": 4.0,
      "low_freq_factor": 1.0,
      "high_freq_factor": 4.0,
      "original_max_position_embeddings": 16,
    },
    rope_theta=500.0,
    bos_token_id=eot,
    eos_token_id=eot,
  ),
  # Tied head, linear RoPE scaling, no biases; saved in shards with an index.
  "llama_tied": lambda v, eot: transformers.LlamaConfig(
    vocab_size=v,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    rope_scaling={"rope_type": "linear", "factor": 2.0},
    bos_token_id=eot,
    eos_token_id=eot,
  ),
  # Qwen2: q/k/v biases without an o_proj bias, GQA, tied head.
  "qwen2": lambda v, eot: transformers.Qwen2Config(
    vocab_size=v,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=1,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    use_sliding_window=False,
    bos_token_id=eot,
    eos_token_id=eot,
  ),
}
SHARDED = {"llama_tied"}


def margins(model, prompt: torch.Tensor, n: int) -> float:
  """Smallest top-1 minus top-2 logit over the ``n`` greedy steps."""
  out = model.generate(
    prompt,
    do_sample=False,
    max_new_tokens=n,
    min_new_tokens=n,
    output_logits=True,
    return_dict_in_generate=True,
    pad_token_id=0,
  )
  worst = float("inf")
  for step in out.logits:
    top = torch.topk(step[0].float(), 2).values
    worst = min(worst, float(top[0] - top[1]))
  return worst


def make(name: str, tok: Tokenizer, seed: int) -> None:
  eot = tok.token_to_id(EOT)
  config = FIXTURES[name](tok.get_vocab_size(), eot)
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
  randomise(model, seed)
  out = os.path.join(ROOT, name)
  shutil.rmtree(out, ignore_errors=True)
  model.save_pretrained(out, max_shard_size="40KB" if name in SHARDED else "5GB")
  tok.save(os.path.join(out, "tokenizer.json"))
  with open(os.path.join(out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump({"bos_token": EOT, "eos_token": EOT}, f)
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, tok.get_vocab_size(), (2, 16)).astype(np.int32)
  prompt = rng.integers(1, tok.get_vocab_size(), (1, 5)).astype(np.int32)
  with torch.no_grad():
    logits = model(torch.from_numpy(tokens).long()).logits.float().numpy()
    greedy = (
      model.generate(
        torch.from_numpy(prompt).long(),
        do_sample=False,
        max_new_tokens=32,
        min_new_tokens=32,
        pad_token_id=0,
      )
      .numpy()
      .astype(np.int32)
    )
    margin = margins(model, torch.from_numpy(prompt).long(), 32)
  if margin < 1e-3:  # a near tie could flip on fp32 rounding: draw another model
    if seed >= 1000 * (list(FIXTURES).index(name) + 1) - 1:
      raise SystemExit(f"{name}: no seed gives a greedy margin >= 1e-3")
    return make(name, tok, seed + 1)
  np.save(os.path.join(out, "tokens.npy"), tokens)
  np.save(os.path.join(out, "logits.npy"), logits.astype(np.float32))
  np.save(os.path.join(out, "prompt.npy"), prompt)
  np.save(os.path.join(out, "greedy.npy"), greedy)
  size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
  print(
    f"{name}: seed {seed}, {sorted(os.listdir(out))}, {size / 1024:.0f} KiB, "
    f"greedy margin {margin:.3g}"
  )


def check_export(name: str) -> float:
  """llm_mp import -> export -> transformers from_pretrained: max |logit diff|."""
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from llm_mp import hf  # pylint: disable=import-outside-toplevel

  src = os.path.join(ROOT, name)
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "export")
    hf.export_hf(hf.import_hf(src), out)
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = np.load(os.path.join(src, "tokens.npy"))
    with torch.no_grad():
      logits = model(torch.from_numpy(tokens).long()).logits.float().numpy()
    transformers.AutoTokenizer.from_pretrained(out)  # loadable too
  return float(np.abs(logits - np.load(os.path.join(src, "logits.npy"))).max())


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--check", action="store_true", help="also check that llm_mp's export loads in transformers"
  )
  args = parser.parse_args()
  tok = build_tokenizer()
  for i, name in enumerate(FIXTURES):
    make(name, tok, seed=1000 * i)
  if args.check:
    for name in FIXTURES:
      print(
        f"{name}: exported by llm_mp, reloaded by transformers: max |dlogit| = "
        f"{check_export(name):.3g}"
      )


if __name__ == "__main__":
  main()
