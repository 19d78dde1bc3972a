"""Named configurations: the CPU sizes the tests and experiments train, and the shapes
of the published models they mirror (GPT-2, LLaMA, BERT, the Transformer, T5).

:data:`PRESETS` maps a name to a function returning its :class:`~llm_mp.config.Config`;
:func:`get_preset` looks one up. ``--preset NAME`` on the command line and
``llm_mp.get_preset`` read them.
"""

from __future__ import annotations

import dataclasses

from llm_mp.config import (
  Config,
  DataConfig,
  ModelConfig,
  OptimConfig,
  PrecisionConfig,
  TrainConfig,
)


def _tiny() -> Config:
  # Trains in a few minutes on 2 CPU cores. LLaMA-style: with RoPE it leaves the
  # unigram plateau in ~100 steps on the default corpus, where learned positions
  # (gpt2_tiny) take ~400 (measured 2026-11-23: loss 1.89 vs 2.53 at step 300).
  return Config(
    model=ModelConfig.llama(
      vocab_size=259,
      vocab_multiple=64,
      d_model=128,
      n_layers=4,
      n_heads=4,
      n_kv_heads=2,
      max_len=128,
    ),
    optim=OptimConfig(lr=2e-3, warmup_steps=50),
    data=DataConfig(seq_len=128),
    train=TrainConfig(steps=600, batch_size=16, log_every=20, eval_every=200, ckpt_every=200),
  )


def _gpt2_tiny() -> Config:
  c = _tiny()
  return dataclasses.replace(
    c,
    model=ModelConfig.gpt2(
      vocab_size=259, vocab_multiple=64, d_model=128, n_layers=4, n_heads=4, max_len=128
    ),
  )


def _gpt2_124m() -> Config:
  return Config(
    model=ModelConfig.gpt2(vocab_size=50304, d_model=768, n_layers=12, n_heads=12, max_len=1024),
    optim=OptimConfig(lr=6e-4, warmup_steps=700),
    data=DataConfig(tokenizer="bpe", bpe_vocab_size=50304, seq_len=1024),
    train=TrainConfig(steps=20_000, batch_size=16, eval_every=1000, ckpt_every=1000),
    precision=PrecisionConfig(policy="bf16"),
  )


def _gpt2_350m() -> Config:
  c = _gpt2_124m()
  return dataclasses.replace(
    c, model=dataclasses.replace(c.model, d_model=1024, n_layers=24, n_heads=16)
  )


def _llama_1b() -> Config:
  c = _gpt2_124m()
  return dataclasses.replace(
    c,
    model=ModelConfig.llama(
      vocab_size=50304, d_model=2048, n_layers=16, n_heads=16, n_kv_heads=8, d_ff=5632, max_len=1024
    ),
  )


def _nanogpt_cpu() -> Config:
  # nanoGPT's small CPU configuration, the CPU speed reference in shared/bench, with
  # the default byte tokenizer's vocabulary (nanoGPT's 65 characters need its own).
  return Config(
    model=ModelConfig.gpt2(vocab_size=259, d_model=128, n_layers=4, n_heads=4, max_len=64),
    optim=OptimConfig(lr=6e-4, warmup_steps=0, schedule="constant", clip_norm=None),
    data=DataConfig(seq_len=64),
    train=TrainConfig(steps=2000, batch_size=12),
  )


def _encoder_tiny() -> Config:
  # The CPU encoder: tiny's size, bidirectional, bert_base's blocks (LayerNorm with
  # bias, GELU, tied MLM head, dropout 0.1) but rotary positions: on the default corpus,
  # 300 fp32 MLM steps reach eval loss 2.33 / accuracy 38% on selected tokens with RoPE,
  # 2.97 / 22% with learned positions (unigram entropy 3.31) (measured 2026-11-27, seed 0).
  return Config(
    model=ModelConfig.gpt2(
      family="encoder",
      vocab_size=259,
      d_model=128,
      n_layers=4,
      n_heads=4,
      max_len=128,
      dropout=0.1,
      position="rope",
    ),
    optim=OptimConfig(lr=1e-3, warmup_steps=50, weight_decay=0.01),
    data=DataConfig(seq_len=128),
    train=TrainConfig(
      task="mlm", steps=600, batch_size=16, log_every=20, eval_every=200, ckpt_every=200
    ),
  )


def _bert_base() -> Config:
  # BERT-base's shape (Devlin et al. 2018, 110M parameters) with llm_mp's pre-norm
  # blocks; optimizer as BERT's pre-training (Adam b2 0.999, weight decay 0.01, 10k
  # warm-up steps, linear decay to 0, batch 256). seq_len 128 is BERT's first phase
  # (90% of its steps); data.seq_len=512 is the second. norm_eps 1e-12 is BERT's; it
  # relies on norm statistics staying fp32 (the *norm* override): it is 0 in fp16.
  return Config(
    model=ModelConfig.gpt2(
      family="encoder",
      vocab_size=30522,
      d_model=768,
      n_layers=12,
      n_heads=12,
      d_ff=3072,
      max_len=512,
      dropout=0.1,
      norm_eps=1e-12,
    ),
    optim=OptimConfig(
      lr=1e-4,
      warmup_steps=10_000,
      schedule="linear",
      end_lr_ratio=0.0,
      b2=0.999,
      eps=1e-6,
      weight_decay=0.01,
    ),
    data=DataConfig(tokenizer="bpe", bpe_vocab_size=30522, seq_len=128),
    train=TrainConfig(
      task="mlm",
      steps=1_000_000,
      batch_size=256,
      eval_every=10_000,
      ckpt_every=10_000,
    ),
    precision=PrecisionConfig(policy="bf16"),
  )


def _seq2seq_tiny() -> Config:
  # The CPU encoder-decoder: 2+2 pre-norm blocks of width 128, T5's relative position
  # bias (no position table: source and target lengths are free up to max_len), shared
  # source/target embedding tied to the output head.
  return Config(
    model=ModelConfig.gpt2(
      family="encoder_decoder",
      vocab_size=259,
      d_model=128,
      n_layers=2,
      n_decoder_layers=2,
      n_heads=4,
      max_len=128,
      position="relative",
      dropout=0.1,
    ),
    optim=OptimConfig(lr=1e-3, warmup_steps=50, weight_decay=0.01),
    data=DataConfig(seq_len=128),
    train=TrainConfig(
      task="seq2seq", steps=600, batch_size=16, log_every=20, eval_every=200, ckpt_every=200
    ),
  )


def _transformer_base() -> Config:
  # "Attention is all you need" (Vaswani et al. 2017) base: 6+6 layers, d=512, 8 heads,
  # d_ff=2048, ReLU, sinusoidal positions, dropout 0.1, one embedding shared by source,
  # target and output (their shared BPE vocabulary), Adam b2=0.98 eps=1e-9, 4000 warm-up
  # steps. Unlike the paper (post-norm) the blocks are pre-norm, as everywhere in llm_mp,
  # and the schedule is llm_mp's warm-up + cosine rather than inverse square root.
  return Config(
    model=ModelConfig(
      family="encoder_decoder",
      vocab_size=37000,
      d_model=512,
      n_layers=6,
      n_decoder_layers=6,
      n_heads=8,
      d_ff=2048,
      max_len=256,
      dropout=0.1,
      norm="layernorm",
      position="sinusoidal",
      mlp="relu",
      use_bias=True,
      tie_embeddings=True,
      share_embeddings=True,
    ),
    optim=OptimConfig(lr=7e-4, warmup_steps=4000, b1=0.9, b2=0.98, eps=1e-9, weight_decay=0.0),
    data=DataConfig(tokenizer="bpe", bpe_vocab_size=37000, seq_len=256),
    train=TrainConfig(
      task="seq2seq",
      steps=100_000,
      batch_size=128,
      eval_every=1000,
      ckpt_every=1000,
    ),
    precision=PrecisionConfig(policy="bf16"),
  )


def _t5_small() -> Config:
  # T5-small's shape (Raffel et al. 2020, v1.0, 60M parameters): 6+6 layers, d=512,
  # 8 heads (head dim 64), d_ff=2048 ReLU, RMSNorm, no biases, relative position bias
  # (32 buckets, max distance 128), one embedding for source, target and output,
  # dropout 0.1. T5 folds 1/sqrt(head_dim) into its init; here attention scales
  # as everywhere else in llm_mp, and the head is not rescaled by d^-0.5.
  return Config(
    model=ModelConfig(
      family="encoder_decoder",
      vocab_size=32128,
      d_model=512,
      n_layers=6,
      n_decoder_layers=6,
      n_heads=8,
      d_ff=2048,
      max_len=512,
      dropout=0.1,
      norm="rmsnorm",
      norm_eps=1e-6,
      position="relative",
      relative_buckets=32,
      relative_max_distance=128,
      mlp="relu",
      use_bias=False,
      tie_embeddings=True,
      share_embeddings=True,
    ),
    optim=OptimConfig(lr=1e-3, warmup_steps=1000, weight_decay=0.0),
    data=DataConfig(tokenizer="bpe", bpe_vocab_size=32128, seq_len=512),
    train=TrainConfig(
      task="seq2seq",
      steps=100_000,
      batch_size=128,
      eval_every=1000,
      ckpt_every=1000,
    ),
    precision=PrecisionConfig(policy="bf16"),
  )


PRESETS = {
  "tiny": _tiny,
  "nanogpt_cpu": _nanogpt_cpu,
  "gpt2_tiny": _gpt2_tiny,
  "gpt2_124m": _gpt2_124m,
  "gpt2_350m": _gpt2_350m,
  "llama_1b": _llama_1b,
  "encoder_tiny": _encoder_tiny,
  "bert_base": _bert_base,
  "seq2seq_tiny": _seq2seq_tiny,
  "transformer_base": _transformer_base,
  "t5_small": _t5_small,
}


def get_preset(name: str) -> Config:
  """Returns the named preset Config; ValueError lists the known names."""
  if name not in PRESETS:
    raise ValueError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
  return PRESETS[name]()
