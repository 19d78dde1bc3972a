"""llm_mp: Transformer language models in JAX/Flax with explicit mixed precision.

The supported API, from the bottom layer up::

  config     Config, ModelConfig, OptimConfig, DataConfig, TrainConfig, MeshConfig,
             get_preset, apply_overrides
  precision  Precision, make_precision, precision_report
  models     TransformerLM (and blocks in llm_mp.models)
  optim      make_optimizer; loss scales in llm_mp.loss_scale
  state      TrainState, make_init_fn
  step       make_train_step, make_eval_step, cross_entropy
  decode     sample_logits (llm_mp.decode: the sampling, greedy and beam-search loops)
  generate   generate_text, generate_seq2seq_text (llm_mp.generate.generate and
             generate_seq2seq for token arrays)
  train      train (the loop); llm_mp.cli is the `llm-mp` command

Data (llm_mp.data), sharding (llm_mp.sharding), checkpoints
(llm_mp.checkpoint) and numerics diagnostics (llm_mp.numerics: exponent
histograms, fp16/bf16/fp8 under/overflow, policy errors vs float64) are
imported as modules.
"""

from llm_mp.config import (
  Config,
  DataConfig,
  MeshConfig,
  ModelConfig,
  OptimConfig,
  TrainConfig,
  apply_overrides,
  get_preset,
)
from llm_mp.decode import sample_logits
from llm_mp.generate import generate_seq2seq_text, generate_text
from llm_mp.loss_scale import DynamicLossScale, NoOpLossScale, StaticLossScale, make_loss_scale
from llm_mp.models import TransformerLM
from llm_mp.optim import make_optimizer
from llm_mp.precision import Precision, make_precision, precision_report
from llm_mp.state import TrainState, make_init_fn
from llm_mp.step import cross_entropy, make_eval_step, make_train_step

__version__ = "0.1.0"

__all__ = [
  "Config",
  "DataConfig",
  "DynamicLossScale",
  "MeshConfig",
  "ModelConfig",
  "NoOpLossScale",
  "OptimConfig",
  "Precision",
  "StaticLossScale",
  "TrainConfig",
  "TrainState",
  "TransformerLM",
  "apply_overrides",
  "cross_entropy",
  "generate_seq2seq_text",
  "generate_text",
  "get_preset",
  "make_eval_step",
  "make_init_fn",
  "make_loss_scale",
  "make_optimizer",
  "make_precision",
  "make_train_step",
  "precision_report",
  "sample_logits",
]
