"""Configs as plain, frozen, validated data.

Every experiment is described by one :class:`Config` made of sections
(:class:`ModelConfig`, :class:`OptimConfig`, :class:`DataConfig`,
:class:`TrainConfig`, :class:`PrecisionConfig`, :class:`MeshConfig`). Each
section validates itself on construction and raises ``ValueError`` naming the
field and the bad value.
:func:`apply_overrides` applies dotted ``section.field=value`` overrides and
rejects unknown keys. Named configs are in :mod:`llm_mp.presets`, the generated
reference of every field in :mod:`llm_mp.config_docs`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from typing import Any, Iterable, Mapping, Sequence

from llm_mp.config_values import check_choice, check_positive, check_value, parse_value
from llm_mp.model_config import (  # the model section and its choice lists
  ModelConfig,
)

OPTIMIZERS = ("adamw", "adam", "sgd", "rmsprop", "adagrad")
SCHEDULES = ("cosine", "linear", "constant")
TOKENIZERS = ("byte", "bpe")
STATE_DTYPES = ("float32", "fp32", "f32", "bfloat16", "bf16")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """Optimizer, schedule, clipping, weight decay and gradient accumulation."""

  name: str = "adamw"  # "adamw", "adam", "sgd", "rmsprop" or "adagrad"
  lr: float = 1e-3  # peak learning rate
  warmup_steps: int = 100  # linear warm-up from 0 to lr
  schedule: str = "cosine"  # decay after warm-up: "cosine", "linear" (to end_lr) or "constant"
  end_lr_ratio: float = 0.1  # final lr as a fraction of the peak
  b1: float = 0.9  # gradient decay of adam(w)
  b2: float = 0.95  # squared-gradient decay of adam(w) and rmsprop
  eps: float = 1e-8  # added to the denominator of adaptive optimizers
  momentum: float = 0.9  # sgd and rmsprop
  weight_decay: float = 0.1  # decoupled (adamw) or L2 decay of matrices
  decay_norms: bool = False  # whether weight decay also applies to norm scales
  decay_biases: bool = False  # whether weight decay also applies to biases
  decay_embeddings: bool = False  # ... and to embedding tables
  clip_norm: float | None = 1.0  # global-norm clipping of unscaled gradients; None = off
  grad_accum_steps: int = 1  # micro-batches per optimizer update
  # Length of the lr schedule. None = train.steps when the run is created; the
  # trainer then stores it, so changing train.steps on resume (extending or
  # stopping a run early) leaves the learning-rate curve as it was.
  schedule_steps: int | None = None
  # Storage of the optimizer's moments (Adam's mu and nu, momentum, Adagrad's sums):
  # "bf16" keeps them in bf16 and does their arithmetic in fp32; "float32" keeps
  # them in the params' dtype (fp32, or bf16 under pure_bf16).
  state_dtype: str = "float32"
  # bf16 params (e.g. pure_bf16): store p + update rounded stochastically (unbiased)
  # instead of to nearest, so updates below half a bf16 ulp are not lost on average.
  # No effect on fp32 params.
  stochastic_rounding: bool = False

  def __post_init__(self):
    s = "optim"
    # Names llm_mp.precision.parse_dtype reads as fp32 or bf16 (fp16 moments underflow).
    check_choice(s, "state_dtype", self.state_dtype.strip().lower(), STATE_DTYPES)
    check_choice(s, "name", self.name, OPTIMIZERS)
    check_choice(s, "schedule", self.schedule, SCHEDULES)
    check_positive(s, "lr", self.lr)
    check_positive(s, "warmup_steps", self.warmup_steps, allow_zero=True)
    check_positive(s, "weight_decay", self.weight_decay, allow_zero=True)
    check_positive(s, "grad_accum_steps", self.grad_accum_steps)
    if self.clip_norm is not None:
      check_positive(s, "clip_norm", self.clip_norm)
    if self.schedule_steps is not None:
      check_positive(s, "schedule_steps", self.schedule_steps)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where text comes from and how it becomes token rows."""

  paths: tuple[str, ...] = ()  # files or directories of .txt/.jsonl; () = the embedded corpus
  # Labelled data only: validation files (e.g. SST-2 dev.tsv); () = hold out val_fraction.
  val_paths: tuple[str, ...] = ()
  tokenizer: str = "byte"  # "byte" (256 + specials) or "bpe" (trained with `tokenizers`)
  bpe_vocab_size: int = 1024  # size of the trained BPE vocabulary (specials included)
  seq_len: int = 128  # tokens per packed row (seq2seq: per source row)
  target_len: int | None = None  # seq2seq: tokens per target row (longer are cut); None = seq_len
  val_fraction: float = 0.05  # fraction of the text held out for validation; 0 = no evaluation
  min_doc_chars: int = 16  # shorter documents are dropped during cleaning
  skip_bad_files: bool = False  # skip non-UTF-8 files with a warning instead of failing
  max_docs: int | None = None  # keep only the first N documents (quick runs)
  # Labelled data (task "classify"): .tsv/.csv with a header, or .jsonl.
  text_field: str = "text"  # column / key holding the text ("sentence" for SST-2)
  label_field: str = "label"  # column / key holding the class (0..n_classes-1 or a name)
  bad_rows: str = "error"  # a row without text or with an unknown label: "error" or "skip"
  source_field: str = "input"  # seq2seq .jsonl: key holding the source ("article" for BBC)
  target_field: str = "target"  # seq2seq .jsonl: key holding the target (a string or a list)
  # Span extraction (task "span", SQuAD-format .json): a long context is read in windows
  # of seq_len tokens (with the question), each starting doc_stride context tokens later.
  doc_stride: int = 64
  max_answer_len: int = 30  # the longest predicted answer, in tokens

  def __post_init__(self):
    s = "data"
    check_choice(s, "tokenizer", self.tokenizer, TOKENIZERS)
    check_positive(s, "seq_len", self.seq_len)
    if self.target_len is not None:
      check_positive(s, "target_len", self.target_len)
    check_positive(s, "bpe_vocab_size", self.bpe_vocab_size)
    check_positive(s, "doc_stride", self.doc_stride)
    check_positive(s, "max_answer_len", self.max_answer_len)
    check_choice(s, "bad_rows", self.bad_rows, ("error", "skip"))
    if not 0.0 <= self.val_fraction < 1.0:
      raise ValueError(f"data.val_fraction={self.val_fraction!r} must be in [0, 1)")
    for name in ("paths", "val_paths"):
      value = getattr(self, name)
      object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))


MESH_AXES = ("data", "fsdp", "tensor")


def _as_rule(entry: Any) -> tuple[str, str | tuple[str, ...] | None]:
  """('mlp', ['fsdp', 'tensor']) -> ('mlp', ('fsdp', 'tensor')); ValueError if malformed."""
  if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], str)):
    raise ValueError(f"mesh.rules entry {entry!r} is not a (logical axis, mesh axes) pair")
  logical, axes = entry
  if isinstance(axes, list):
    axes = tuple(axes)
  names = (axes,) if isinstance(axes, str) else axes or ()
  unknown = [a for a in names if a not in MESH_AXES]
  if unknown:
    raise ValueError(
      f"mesh.rules entry {entry!r} names unknown mesh axes {unknown}; known: {list(MESH_AXES)}"
    )
  return logical, axes


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh axis sizes, and optional overrides of the logical-axis rules.

  ``llm_mp.sharding`` maps the model's logical axis names to these mesh axes;
  an axis of size 1 shards nothing, so the sizes alone choose data parallelism
  (``data``), fully sharded data parallelism (``fsdp``), tensor parallelism
  (``tensor``) or any product of them.
  """

  data: int = -1  # batch split, parameters replicated
  fsdp: int = 1  # batch split and parameters / optimizer state split on "embed"
  tensor: int = 1  # heads, MLP hidden units, vocabulary and experts split
  # (logical axis, mesh axis | tuple of mesh axes | None) pairs placed before the
  # defaults of llm_mp.sharding.DEFAULT_RULES, so they take precedence there.
  rules: tuple[tuple[str, Any], ...] = ()

  def __post_init__(self):
    sizes = (self.data, self.fsdp, self.tensor)
    if sum(1 for x in sizes if x == -1) > 1:
      raise ValueError(
        f"mesh: at most one axis may be -1, got data={self.data}, "
        f"fsdp={self.fsdp}, tensor={self.tensor}"
      )
    for name, x in zip(MESH_AXES, sizes):
      if x != -1 and x < 1:
        raise ValueError(f"mesh.{name}={x} must be >= 1 or -1")
    # Lists (from JSON) become tuples, so a stored config equals the one written.
    object.__setattr__(self, "rules", tuple(_as_rule(r) for r in self.rules))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The training loop: length, batch, precision, logging and checkpoints."""

  # A task of the registry (llm_mp.tasks: lm, mlm, classify, seq2seq, ...), or "auto": the
  # family's default (lm for decoders, mlm for encoders, seq2seq for encoder-decoders)
  task: str = "auto"
  steps: int = 300  # optimizer updates; may change on resume (see optim.schedule_steps)
  batch_size: int = 16  # rows per optimizer update (split into grad_accum_steps micro-batches)
  z_loss: float = 0.0  # weight of log(Z)^2, keeps logits from drifting
  mlm_probability: float = 0.15  # masked LM: fraction of real tokens selected (80/10/10)
  # Also report grad_zero_fraction/<layer> (embed, each block, head): where fp16 underflows.
  layer_metrics: bool = False
  seed: int = 0  # parameter init, dropout and data shuffling
  log_every: int = 10  # steps between metrics.jsonl records
  eval_every: int = 100  # steps between evaluations (and samples)
  eval_batches: int = 8  # validation batches per evaluation; 0: the whole validation split
  ckpt_every: int = 100  # steps between checkpoints
  keep_checkpoints: int = 3  # newest checkpoints kept on disk
  sample_prompt: str = "The "  # at each evaluation a sample continues it (log, TensorBoard)
  sample_tokens: int = 200  # its length (clipped to the context); 0 = no sample
  # Fine-tuning: start from another run's latest checkpoint (its backbone
  # parameters and tokenizer; heads it lacks are initialised fresh).
  init_from: str | None = None
  # Heads initialised fresh when fine-tuning: "auto" = those the source run's task does not
  # share with this run's (an LM head into LM fine-tuning is kept), "all", or head modules
  # "lm_head,classifier".
  reinit_heads: str = "auto"
  # fnmatch patterns on '/'-joined parameter paths (e.g. "embed/*,encoder/blocks_0/*")
  # whose parameters stay fixed; "" trains everything.
  freeze: str = ""
  backbone_lr_scale: float = 1.0  # lr multiplier for non-head parameters when fine-tuning
  # Distillation (train.task=distill): the teacher run directory, evaluated inside each step.
  teacher: str | None = None
  distill_weight: float = 0.5  # alpha: loss = (1 - alpha) * data CE + alpha * T^2 * KL
  distill_temperature: float = 2.0  # T: both distributions softened by logits / T

  def __post_init__(self):
    s = "train"
    for f in (
      "steps",
      "batch_size",
      "log_every",
      "eval_every",
      "ckpt_every",
      "keep_checkpoints",
    ):
      check_positive(s, f, getattr(self, f))
    check_positive(s, "eval_batches", self.eval_batches, allow_zero=True)
    check_positive(s, "backbone_lr_scale", self.backbone_lr_scale, allow_zero=True)
    check_positive(s, "z_loss", self.z_loss, allow_zero=True)
    check_positive(s, "sample_tokens", self.sample_tokens, allow_zero=True)
    if not 0.0 < self.mlm_probability < 1.0:
      raise ValueError(f"train.mlm_probability={self.mlm_probability!r} must be in (0, 1)")
    if not 0.0 <= self.distill_weight <= 1.0:
      raise ValueError(f"train.distill_weight={self.distill_weight!r} must be in [0, 1]")
    check_positive(s, "distill_temperature", self.distill_temperature)


# Loss scaling kinds (llm_mp.loss_scale builds each; "auto" in the config picks the policy's).
LOSS_SCALES = ("none", "static", "dynamic")


@dataclasses.dataclass(frozen=True)
class PrecisionConfig:
  """Number formats: the dtype policy, per-module overrides, loss scaling, matmul formats."""

  # A preset of llm_mp.precision (fp32, bf16, fp16, pure_bf16) or a jmp policy "p=f32,c=bf16,o=bf16"
  policy: str = "fp32"
  # Per-module dtype overrides "pattern=spec;...", after the defaults (norms, router, heads in
  # fp32), e.g. "*mlp*=f32;lm_head=c=f32,o=f32"; a bare dtype sets the compute dtype.
  overrides: str = ""
  loss_scale: str = "auto"  # "auto" (the policy's), "none", "static", "dynamic"
  init_loss_scale: float = 2.0**15  # first loss scale (static or dynamic scaling)
  loss_scale_period: int = 2000  # finite steps before a dynamic scale grows
  # Matmul formats "pattern=format;..." or a bare format for every matmul: none, fp8, int8
  # (quantisation-aware training), int8-weight, int4-weight (weight-only), lowrank:RANK.
  formats: str = ""
  # Whether formats also reach the first and last block and the heads (default: those keep
  # the dtype policy).
  format_edges: bool = False
  fp8_scaling: str = "delayed"  # "delayed" (amax history) or "current" (amax of this tensor)
  amax_history: int = 16  # delayed scaling: steps of amax kept per tensor
  fp8_margin: int = 0  # scale = amax / fp8_max * 2**margin (amax lands at fp8_max / 2**margin)
  int8_activations: str = "tensor"  # int8 QAT activation scales: per "tensor" or per "token"
  group_size: int = 128  # int4-weight: input rows sharing one scale

  def __post_init__(self):
    s = "precision"
    check_choice(s, "loss_scale", self.loss_scale, ("auto",) + LOSS_SCALES)
    check_choice(s, "fp8_scaling", self.fp8_scaling, ("delayed", "current"))
    check_choice(s, "int8_activations", self.int8_activations, ("tensor", "token"))
    for f in ("init_loss_scale", "loss_scale_period", "amax_history", "group_size"):
      check_positive(s, f, getattr(self, f))
    check_positive(s, "fp8_margin", self.fp8_margin, allow_zero=True)


@dataclasses.dataclass(frozen=True)
class Config:
  """A whole run: one value, written to the run directory as JSON."""

  model: ModelConfig = ModelConfig()
  optim: OptimConfig = OptimConfig()
  data: DataConfig = DataConfig()
  train: TrainConfig = TrainConfig()
  precision: PrecisionConfig = PrecisionConfig()
  mesh: MeshConfig = MeshConfig()

  def __post_init__(self):
    for name in ("seq_len", "target_len"):
      length = getattr(self.data, name)
      if length is not None and length > self.model.max_len:
        raise ValueError(f"data.{name}={length} is longer than model.max_len={self.model.max_len}")
    if self.train.batch_size % self.optim.grad_accum_steps:
      raise ValueError(
        f"optim.grad_accum_steps={self.optim.grad_accum_steps} does not divide "
        f"train.batch_size={self.train.batch_size}"
      )

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> Config:
    """The Config of a ``to_dict()`` (e.g. a loaded config.json); missing keys take
    defaults. Raises ValueError naming ``section.field`` for an unknown key or a
    value of the wrong type (``"steps": 10.0`` for an int field)."""
    if not isinstance(d, Mapping):
      raise ValueError(f"expected an object of config sections, got {type(d).__name__}")
    sections = {f.name: f.type for f in dataclasses.fields(cls)}
    unknown = set(d) - set(sections)
    if unknown:
      raise ValueError(f"unknown config section(s) {sorted(unknown)}; known: {sorted(sections)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
      if f.name in d:
        section_cls = type(getattr(cls(), f.name))
        values = d[f.name]
        if not isinstance(values, Mapping):
          raise ValueError(f"config section {f.name!r} must be an object, got {values!r}")
        _check_keys(f.name, section_cls, values)
        hints = typing.get_type_hints(section_cls)
        kwargs[f.name] = section_cls(
          **{k: check_value(f"{f.name}.{k}", hints[k], v) for k, v in values.items()}
        )
    return cls(**kwargs)


def _check_keys(section: str, section_cls: type, values: Mapping[str, Any]) -> None:
  known = {f.name for f in dataclasses.fields(section_cls)}
  unknown = set(values) - known
  if unknown:
    raise ValueError(
      f"unknown key(s) {sorted(f'{section}.{k}' for k in unknown)}; known: {sorted(known)}"
    )


def _did_you_mean(name: str, known: Iterable[str], prefix: str = "") -> str:
  """' did you mean 'x'?' for the known name closest to ``name`` (difflib), else ''."""
  close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
  return f" did you mean {prefix + close[0]!r}?" if close else ""


def apply_overrides(config: Config, overrides: Sequence[str]) -> Config:
  """Returns ``config`` with ``section.field=value`` strings applied.

  Raises ValueError for a malformed override, an unknown section or field, or a
  value the section's validation rejects.
  """
  d = config.to_dict()
  for item in overrides:
    if "=" not in item:
      raise ValueError(f"override {item!r} is not of the form section.field=value")
    key, value = item.split("=", 1)
    if "." not in key:
      raise ValueError(f"override key {key!r} is not of the form section.field")
    section, field = key.split(".", 1)
    if section not in d:
      raise ValueError(
        f"unknown config section {section!r} in override {item!r};"
        f"{_did_you_mean(section, d)} known: {sorted(d)}"
      )
    if field not in d[section]:
      raise ValueError(
        f"unknown key {key!r};{_did_you_mean(field, d[section], section + '.')} "
        f"known: {sorted(d[section])}"
      )
    section_cls = type(getattr(config, section))
    d[section][field] = parse_value(key, typing.get_type_hints(section_cls)[field], value)
  return Config.from_dict(d)
