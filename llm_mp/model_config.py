"""The model section of a config: shape and architecture of a Transformer, and the
choice lists of its fields (re-exported by :mod:`llm_mp.config`)."""

from __future__ import annotations

import dataclasses

from llm_mp.config_values import check_choice, check_positive

NORMS = ("layernorm", "rmsnorm")
# "relative": T5's bucketed relative position bias, added to self-attention logits.
POSITIONS = ("learned", "rope", "sinusoidal", "relative", "none")
# "gelu" is GPT-2's tanh approximation (HF "gelu_new"); "gelu_exact" is the erf form (HF "gelu").
GATED_MLPS = ("swiglu", "geglu")  # act(x @ gate) * (x @ up): two input matrices
MLPS = ("gelu", "gelu_exact", "relu", *GATED_MLPS)
ROPE_SCALINGS = ("none", "linear", "llama3")  # HF rope_scaling "rope_type"s
ATTENTION_IMPLS = ("auto", "xla", "cudnn")
REMAT_POLICIES = ("none", "dots", "full")
FAMILIES = ("decoder", "encoder", "encoder_decoder")  # llm_mp.models.FAMILIES builds each
POOLS = ("first", "mean")


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
  # Encoder: a learned embedding of this many token types, added to the token embeddings
  # (0: none). Task "span" gives type 1 to context tokens whose word is in the question.
  n_token_types: int = 0
  init_std: float = 0.02  # std of the normal initialisation of weights

  def __post_init__(self):
    s = "model"
    for f in ("vocab_size", "vocab_multiple", "d_model", "n_layers", "n_heads", "max_len"):
      check_positive(s, f, getattr(self, f))
    check_choice(s, "norm", self.norm, NORMS)
    check_choice(s, "position", self.position, POSITIONS)
    check_choice(s, "mlp", self.mlp, MLPS)
    check_choice(s, "attention_impl", self.attention_impl, ATTENTION_IMPLS)
    check_choice(s, "remat", self.remat, REMAT_POLICIES)
    check_choice(s, "family", self.family, FAMILIES)
    check_choice(s, "pool", self.pool, POOLS)
    check_positive(s, "n_classes", self.n_classes)
    if self.n_token_types < 0:
      raise ValueError(f"model.n_token_types={self.n_token_types} must be >= 0")
    if self.n_token_types and self.family != "encoder":
      raise ValueError(
        f"model.n_token_types={self.n_token_types} is read by model.family='encoder' only, "
        f"not {self.family!r}"
      )
    if self.n_decoder_layers is not None:
      check_positive(s, "n_decoder_layers", self.n_decoder_layers)
    if self.position == "relative":
      # Bidirectional tables split the buckets in two halves, each with exact and log parts.
      if self.relative_buckets < 4:
        raise ValueError(f"model.relative_buckets={self.relative_buckets} must be >= 4")
      check_positive(s, "relative_max_distance", self.relative_max_distance)
    check_positive(s, "expert_capacity_factor", self.expert_capacity_factor)
    check_positive(s, "moe_aux_weight", self.moe_aux_weight, allow_zero=True)
    check_positive(s, "moe_z_weight", self.moe_z_weight, allow_zero=True)
    check_choice(s, "rope_scaling", self.rope_scaling, ROPE_SCALINGS)
    check_positive(s, "rope_factor", self.rope_factor)
    check_positive(s, "rope_original_max_len", self.rope_original_max_len)
    if self.rope_scaling == "llama3" and self.rope_high_freq_factor <= self.rope_low_freq_factor:
      raise ValueError(
        f"model.rope_high_freq_factor={self.rope_high_freq_factor} must exceed "
        f"model.rope_low_freq_factor={self.rope_low_freq_factor}"
      )
    if self.d_head is not None:
      check_positive(s, "d_head", self.d_head)
    elif self.d_model % self.n_heads:
      raise ValueError(f"model.n_heads={self.n_heads} does not divide model.d_model={self.d_model}")
    if self.n_kv_heads is not None:
      check_positive(s, "n_kv_heads", self.n_kv_heads)
      if self.n_heads % self.n_kv_heads:
        raise ValueError(
          f"model.n_kv_heads={self.n_kv_heads} does not divide model.n_heads={self.n_heads}"
        )
    if self.d_ff is not None:
      check_positive(s, "d_ff", self.d_ff)
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"model.dropout={self.dropout!r} must be in [0, 1)")
    if self.position == "rope" and self.head_dim % 2:
      raise ValueError(f"model.position='rope' needs an even head dim, got {self.head_dim}")
    check_positive(s, "n_experts", self.n_experts, allow_zero=True)
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
