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
import json
import typing
from typing import Any, Mapping, Sequence

from llm_mp.config_values import check_value, parse_value

NORMS = ("layernorm", "rmsnorm")
# "relative": T5's bucketed relative position bias, added to self-attention logits.
POSITIONS = ("learned", "rope", "sinusoidal", "relative", "none")
# "gelu" is GPT-2's tanh approximation (HF "gelu_new"); "gelu_exact" is the erf form (HF "gelu").
GATED_MLPS = ("swiglu", "geglu")  # act(x @ gate) * (x @ up): two input matrices
MLPS = ("gelu", "gelu_exact", "relu", *GATED_MLPS)
ROPE_SCALINGS = ("none", "linear", "llama3")  # HF rope_scaling "rope_type"s
ATTENTION_IMPLS = ("auto", "xla", "cudnn")
REMAT_POLICIES = ("none", "dots", "full")
OPTIMIZERS = ("adamw", "adam", "sgd", "rmsprop", "adagrad")
SCHEDULES = ("cosine", "linear", "constant")
TOKENIZERS = ("byte", "bpe")
FAMILIES = ("decoder", "encoder", "encoder_decoder")  # llm_mp.models.FAMILIES builds each
POOLS = ("first", "mean")
STATE_DTYPES = ("float32", "fp32", "f32", "bfloat16", "bf16")


def _check_choice(section: str, field: str, value: Any, choices: Sequence[Any]) -> None:
  if value not in choices:
    raise ValueError(f"{section}.{field}={value!r} is not one of {list(choices)}")


def _check_positive(section: str, field: str, value: Any, allow_zero: bool = False) -> None:
  ok = value >= 0 if allow_zero else value > 0
  if not ok:
    bound = ">= 0" if allow_zero else "> 0"
    raise ValueError(f"{section}.{field}={value!r} must be {bound}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and architecture of a Transformer.

  The defaults are a tiny GPT-2-style decoder; :meth:`gpt2` and :meth:`llama`
  give the two families' switches.
  """

  # "decoder" (causal LM), "encoder" (bidirectional, BERT-style) or "encoder_decoder" (T5-style)
  family: str = "decoder"
  vocab_size: int = 259  # 256 bytes + 3 specials (the byte tokenizer's size)
  # The embedding and head are padded to a multiple of this (e.g. 64, so a tensor
  # axis divides them); the padded logits are masked, so loss and samples are unchanged.
  vocab_multiple: int = 1
  d_model: int = 64  # width of the residual stream
  n_layers: int = 2  # Transformer blocks (the encoder's, in an encoder-decoder)
  n_decoder_layers: int | None = None  # encoder-decoder only: decoder layers; None = n_layers
  share_embeddings: bool = True  # encoder-decoder: one token table for source and target
  n_heads: int = 4  # attention (query) heads; must divide d_model
  n_kv_heads: int | None = None  # < n_heads gives grouped-query attention; None = n_heads
  d_ff: int | None = None  # hidden width of the MLP; None = 4*d_model (8/3*d_model for GLU MLPs)
  max_len: int = 128  # longest sequence the positions support
  dropout: float = 0.0  # on attention output, MLP output and embeddings
  norm: str = "layernorm"  # "layernorm" (GPT-2) or "rmsnorm" (LLaMA)
  norm_eps: float = 1e-5  # added to the variance in the norms
  position: str = "learned"  # "learned" (GPT-2), "rope" (LLaMA), "sinusoidal" (Vaswani et al.)
  rope_theta: float = 10_000.0  # RoPE base frequency
  # RoPE frequency scaling for longer contexts, as HF's rope_scaling: "linear" divides every
  # frequency by rope_factor; "llama3" divides only the low frequencies (wavelengths above
  # rope_original_max_len / rope_low_freq_factor), interpolating up to rope_high_freq_factor.
  rope_scaling: str = "none"
  rope_factor: float = 1.0  # how much longer the context is than in pre-training (scaling)
  rope_low_freq_factor: float = 1.0  # llama3: wavelengths above original_max_len / this are scaled
  rope_high_freq_factor: float = 4.0  # llama3: wavelengths below original_max_len / this are kept
  rope_original_max_len: int = 8192  # llama3: the pre-training context length
  d_head: int | None = None  # width of one attention head; None = d_model // n_heads
  relative_buckets: int = 32  # position="relative": buckets of T5's relative position bias
  relative_max_distance: int = 128  # distances >= this share the last (log-spaced) bucket
  mlp: str = "gelu"  # "gelu"/"relu" two-layer MLP, or "swiglu"/"geglu" gated
  use_bias: bool = True  # biases in dense layers and LayerNorm (GPT-2: yes, LLaMA: no)
  # Per-part biases; None = use_bias. Qwen2: qkv_bias=True, attn_out_bias=False.
  qkv_bias: bool | None = None  # query/key/value projections
  attn_out_bias: bool | None = None  # attention output projection
  mlp_bias: bool | None = None  # MLP (or expert) layers
  tie_embeddings: bool = True  # logits use the transposed token embedding
  # "xla": llm_mp's attention (fp32 softmax, any backend); "cudnn": the GPU flash-attention
  # kernel; "auto": cudnn on a GPU with bf16/fp16 compute, else xla (llm_mp.builder decides).
  attention_impl: str = "auto"
  remat: str = "none"  # rematerialisation per block: "none", "dots" (save matmuls), "full"
  scan_layers: bool = False  # nn.scan over blocks: one compiled block, faster compiles
  n_experts: int = 0  # >0 replaces the MLP by a mixture of experts
  expert_top_k: int = 2  # experts per token (1: Switch, 2: GShard)
  expert_capacity_factor: float = 1.25  # slots per expert = factor * top_k * tokens / n_experts
  moe_aux_weight: float = 0.01  # weight of the load-balancing loss E * sum_e f_e * p_e
  moe_z_weight: float = 1e-3  # weight of the router z-loss mean(logsumexp(router logits)^2)
  n_classes: int = 2  # outputs of the classification head (task "classify")
  pool: str = "first"  # classification input: "first" token or "mean" over real tokens
  init_std: float = 0.02  # std of the normal initialisation of weights

  def __post_init__(self):
    s = "model"
    for f in ("vocab_size", "vocab_multiple", "d_model", "n_layers", "n_heads", "max_len"):
      _check_positive(s, f, getattr(self, f))
    _check_choice(s, "norm", self.norm, NORMS)
    _check_choice(s, "position", self.position, POSITIONS)
    _check_choice(s, "mlp", self.mlp, MLPS)
    _check_choice(s, "attention_impl", self.attention_impl, ATTENTION_IMPLS)
    _check_choice(s, "remat", self.remat, REMAT_POLICIES)
    _check_choice(s, "family", self.family, FAMILIES)
    _check_choice(s, "pool", self.pool, POOLS)
    _check_positive(s, "n_classes", self.n_classes)
    if self.n_decoder_layers is not None:
      _check_positive(s, "n_decoder_layers", self.n_decoder_layers)
    if self.position == "relative":
      # Bidirectional tables split the buckets in two halves, each with exact and log parts.
      if self.relative_buckets < 4:
        raise ValueError(f"model.relative_buckets={self.relative_buckets} must be >= 4")
      _check_positive(s, "relative_max_distance", self.relative_max_distance)
    _check_positive(s, "expert_capacity_factor", self.expert_capacity_factor)
    _check_positive(s, "moe_aux_weight", self.moe_aux_weight, allow_zero=True)
    _check_positive(s, "moe_z_weight", self.moe_z_weight, allow_zero=True)
    _check_choice(s, "rope_scaling", self.rope_scaling, ROPE_SCALINGS)
    _check_positive(s, "rope_factor", self.rope_factor)
    _check_positive(s, "rope_original_max_len", self.rope_original_max_len)
    if self.rope_scaling == "llama3" and self.rope_high_freq_factor <= self.rope_low_freq_factor:
      raise ValueError(
        f"model.rope_high_freq_factor={self.rope_high_freq_factor} must exceed "
        f"model.rope_low_freq_factor={self.rope_low_freq_factor}"
      )
    if self.d_head is not None:
      _check_positive(s, "d_head", self.d_head)
    elif self.d_model % self.n_heads:
      raise ValueError(f"model.n_heads={self.n_heads} does not divide model.d_model={self.d_model}")
    if self.n_kv_heads is not None:
      _check_positive(s, "n_kv_heads", self.n_kv_heads)
      if self.n_heads % self.n_kv_heads:
        raise ValueError(
          f"model.n_kv_heads={self.n_kv_heads} does not divide model.n_heads={self.n_heads}"
        )
    if self.d_ff is not None:
      _check_positive(s, "d_ff", self.d_ff)
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"model.dropout={self.dropout!r} must be in [0, 1)")
    if self.position == "rope" and self.head_dim % 2:
      raise ValueError(f"model.position='rope' needs an even head dim, got {self.head_dim}")
    _check_positive(s, "n_experts", self.n_experts, allow_zero=True)
    if self.n_experts and not 0 < self.expert_top_k <= self.n_experts:
      raise ValueError(
        f"model.expert_top_k={self.expert_top_k} must be in [1, n_experts={self.n_experts}]"
      )

  @property
  def head_dim(self) -> int:
    return self.d_head or self.d_model // self.n_heads

  def bias(self, part: str) -> bool:
    """Whether dense layers of ``part`` ("qkv", "attn_out", "mlp") have a bias."""
    value = {"qkv": self.qkv_bias, "attn_out": self.attn_out_bias, "mlp": self.mlp_bias}[part]
    return self.use_bias if value is None else value

  @property
  def kv_heads(self) -> int:
    return self.n_kv_heads or self.n_heads

  @property
  def padded_vocab(self) -> int:
    """Rows of the embedding / columns of the logits: vocab_size rounded up to vocab_multiple."""
    return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

  @property
  def ff_dim(self) -> int:
    if self.d_ff is not None:
      return self.d_ff
    if self.mlp in GATED_MLPS:
      # 8/3 d_model keeps the parameter count of a 4 d_model MLP; rounded up to a
      # multiple that tensor axes of 2, 4, ... divide (d_model=128: 341 -> 384).
      m = 256 if self.d_model >= 256 else 64
      return m * -(-(8 * self.d_model // 3) // m)
    return 4 * self.d_model

  @property
  def decoder_layers(self) -> int:
    """Layers of an encoder-decoder's decoder stack (``n_decoder_layers`` or ``n_layers``)."""
    return self.n_layers if self.n_decoder_layers is None else self.n_decoder_layers

  @classmethod
  def gpt2(cls, **kw) -> ModelConfig:
    """GPT-2: LayerNorm with bias, learned positions, GELU MLP, tied embeddings."""
    base = dict(
      norm="layernorm", position="learned", mlp="gelu", use_bias=True, tie_embeddings=True
    )
    return cls(**{**base, **kw})

  @classmethod
  def llama(cls, **kw) -> ModelConfig:
    """LLaMA: RMSNorm, rotary positions, SwiGLU MLP, no biases, untied head."""
    base = dict(
      norm="rmsnorm",
      position="rope",
      mlp="swiglu",
      use_bias=False,
      tie_embeddings=False,
      norm_eps=1e-6,
    )
    return cls(**{**base, **kw})


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
    _check_choice(s, "state_dtype", self.state_dtype.strip().lower(), STATE_DTYPES)
    _check_choice(s, "name", self.name, OPTIMIZERS)
    _check_choice(s, "schedule", self.schedule, SCHEDULES)
    _check_positive(s, "lr", self.lr)
    _check_positive(s, "warmup_steps", self.warmup_steps, allow_zero=True)
    _check_positive(s, "weight_decay", self.weight_decay, allow_zero=True)
    _check_positive(s, "grad_accum_steps", self.grad_accum_steps)
    if self.clip_norm is not None:
      _check_positive(s, "clip_norm", self.clip_norm)
    if self.schedule_steps is not None:
      _check_positive(s, "schedule_steps", self.schedule_steps)


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

  def __post_init__(self):
    s = "data"
    _check_choice(s, "tokenizer", self.tokenizer, TOKENIZERS)
    _check_positive(s, "seq_len", self.seq_len)
    if self.target_len is not None:
      _check_positive(s, "target_len", self.target_len)
    _check_positive(s, "bpe_vocab_size", self.bpe_vocab_size)
    _check_choice(s, "bad_rows", self.bad_rows, ("error", "skip"))
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
  eval_batches: int = 8  # validation batches per evaluation
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
      "eval_batches",
    ):
      _check_positive(s, f, getattr(self, f))
    _check_positive(s, "backbone_lr_scale", self.backbone_lr_scale, allow_zero=True)
    _check_positive(s, "z_loss", self.z_loss, allow_zero=True)
    _check_positive(s, "sample_tokens", self.sample_tokens, allow_zero=True)
    if not 0.0 < self.mlm_probability < 1.0:
      raise ValueError(f"train.mlm_probability={self.mlm_probability!r} must be in (0, 1)")
    if not 0.0 <= self.distill_weight <= 1.0:
      raise ValueError(f"train.distill_weight={self.distill_weight!r} must be in [0, 1]")
    _check_positive(s, "distill_temperature", self.distill_temperature)


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
  fp8_margin: int = 0  # scale = fp8_max / amax / 2**margin
  int8_activations: str = "tensor"  # int8 QAT activation scales: per "tensor" or per "token"
  group_size: int = 128  # int4-weight: input rows sharing one scale

  def __post_init__(self):
    s = "precision"
    _check_choice(s, "loss_scale", self.loss_scale, ("auto",) + LOSS_SCALES)
    _check_choice(s, "fp8_scaling", self.fp8_scaling, ("delayed", "current"))
    _check_choice(s, "int8_activations", self.int8_activations, ("tensor", "token"))
    for f in ("init_loss_scale", "loss_scale_period", "amax_history", "group_size"):
      _check_positive(s, f, getattr(self, f))
    _check_positive(s, "fp8_margin", self.fp8_margin, allow_zero=True)


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
        f"unknown config section {section!r} in override {item!r}; known: {sorted(d)}"
      )
    if field not in d[section]:
      raise ValueError(f"unknown key {key!r}; known: {sorted(d[section])}")
    section_cls = type(getattr(config, section))
    d[section][field] = parse_value(key, typing.get_type_hints(section_cls)[field], value)
  return Config.from_dict(d)
