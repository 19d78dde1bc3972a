"""llm_mp: Transformer language models in JAX/Flax with explicit mixed precision.

The supported API, from the bottom layer up::

  config     Config, ModelConfig, OptimConfig, DataConfig, TrainConfig, MeshConfig,
             apply_overrides
  presets    get_preset
  precision  Precision, make_precision, precision_report
  models     TransformerLM (and blocks in llm_mp.models)
  optim      make_optimizer; loss scales in llm_mp.loss_scale
  tasks      TaskSpec, register_task, make_task (the task registry, llm_mp.tasks)
  state      TrainState, make_init_fn
  step       make_train_step, make_eval_step, cross_entropy
  decode     sample_logits (llm_mp.decode: the sampling, greedy and beam-search loops)
  generate   generate_text, generate_seq2seq_text (llm_mp.generate.generate and
             generate_seq2seq for token arrays)
  builder    build_recipe: the one place a run's model, task and optimizer are built
  rundir     load_run (a trained run: config, recipe, parameters and collections)
  train      train (the loop); llm_mp.cli is the `llm-mp` command

Data (llm_mp.data), sharding (llm_mp.sharding), checkpoints
(llm_mp.checkpoint) and numerics diagnostics (llm_mp.numerics: exponent
histograms, fp16/bf16/fp8 under/overflow, policy errors vs float64) are
imported as modules.
"""

from llm_mp.builder import build_recipe
from llm_mp.config import (
  Config,
  DataConfig,
  MeshConfig,
  ModelConfig,
  OptimConfig,
  TrainConfig,
  apply_overrides,
)
from llm_mp.decode import sample_logits
from llm_mp.generate import generate_seq2seq_text, generate_text
from llm_mp.loss_scale import DynamicLossScale, NoOpLossScale, StaticLossScale, make_loss_scale
from llm_mp.models import TransformerLM
from llm_mp.optim import make_optimizer
from llm_mp.precision import Precision, make_precision, precision_report
from llm_mp.presets import get_preset
from llm_mp.rundir import load_run
from llm_mp.state import TrainState, make_init_fn
from llm_mp.step import cross_entropy, make_eval_step, make_train_step
from llm_mp.tasks import TaskSpec, make_task, register_task

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
  "TaskSpec",
  "TrainConfig",
  "TrainState",
  "TransformerLM",
  "apply_overrides",
  "build_recipe",
  "cross_entropy",
  "generate_seq2seq_text",
  "generate_text",
  "get_preset",
  "load_run",
  "make_eval_step",
  "make_init_fn",
  "make_loss_scale",
  "make_optimizer",
  "make_task",
  "make_precision",
  "make_train_step",
  "precision_report",
  "register_task",
  "sample_logits",
]
