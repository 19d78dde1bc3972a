"""A Hugging Face ``config.json`` <-> an llm_mp ``ModelConfig`` (GPT-2 and the LLaMA family)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from llm_mp.config import Config, ModelConfig
from llm_mp.hf.files import ARCHS, CONFIG_FILE, GPT2_ACTS, LLAMA_ACTS, HFError
from llm_mp.model_config import GATED_MLPS


def _rope_fields(hf: dict[str, Any], path: str) -> dict[str, Any]:
  """ModelConfig RoPE fields from ``rope_scaling`` / ``rope_parameters`` (transformers 5)."""
  params = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling") or params
  theta = params.get("rope_theta", hf.get("rope_theta", 10_000.0))
  kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
  out = {"rope_theta": float(theta)}
  if kind == "default":
    return out
  if kind not in ("linear", "llama3"):
    raise HFError(
      f"{path}: field rope_scaling.rope_type={kind!r} is not supported "
      "(supported: default, linear, llama3)"
    )
  out.update(rope_scaling=kind, rope_factor=float(scaling["factor"]))
  if kind == "llama3":
    out.update(
      rope_low_freq_factor=float(scaling["low_freq_factor"]),
      rope_high_freq_factor=float(scaling["high_freq_factor"]),
      rope_original_max_len=int(scaling["original_max_position_embeddings"]),
    )
  return out


def _require(hf: dict[str, Any], path: str, field: str, ok: Callable[[Any], bool], want: str):
  if field in hf and not ok(hf[field]):
    raise HFError(f"{path}: field {field}={hf[field]!r} is not supported ({want})")


def model_config_from_hf(hf: dict[str, Any], path: str = CONFIG_FILE) -> ModelConfig:
  """The :class:`ModelConfig` of an HF ``config.json`` dict (``path`` names it in errors)."""
  archs = hf.get("architectures") or []
  arch = (
    archs[0]
    if archs
    else {
      "gpt2": "GPT2LMHeadModel",
      "llama": "LlamaForCausalLM",
      "mistral": "MistralForCausalLM",
      "qwen2": "Qwen2ForCausalLM",
    }.get(hf.get("model_type"))
  )
  if arch not in ARCHS:
    raise HFError(
      f"{path}: field architectures={archs or hf.get('model_type')!r} is not "
      f"supported (supported: {', '.join(ARCHS)})"
    )
  try:
    if arch == "GPT2LMHeadModel":
      act = hf.get("activation_function", "gelu_new")
      if act not in GPT2_ACTS:
        raise HFError(
          f"{path}: field activation_function={act!r} is not supported "
          f"(supported: {sorted(GPT2_ACTS)})"
        )
      _require(hf, path, "scale_attn_by_inverse_layer_idx", lambda v: not v, "must be false")
      _require(hf, path, "scale_attn_weights", bool, "must be true")
      _require(hf, path, "add_cross_attention", lambda v: not v, "must be false")
      return ModelConfig.gpt2(
        vocab_size=hf["vocab_size"],
        d_model=hf["n_embd"],
        n_layers=hf["n_layer"],
        n_heads=hf["n_head"],
        d_ff=hf.get("n_inner") or None,
        max_len=hf["n_positions"],
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        mlp=GPT2_ACTS[act],
        tie_embeddings=hf.get("tie_word_embeddings", True),
        dropout=0.0,
      )
    act = hf.get("hidden_act", "silu")
    if act not in LLAMA_ACTS:
      raise HFError(
        f"{path}: field hidden_act={act!r} is not supported (supported: {sorted(LLAMA_ACTS)})"
      )
    if arch == "Qwen2ForCausalLM":
      _require(hf, path, "use_sliding_window", lambda v: not v, "must be false")
      qkv, out, mlp = True, False, False
    else:
      if arch == "MistralForCausalLM":
        _require(
          hf,
          path,
          "sliding_window",
          lambda v: v is None or v >= hf["max_position_embeddings"],
          "must be null or >= max_position_embeddings",
        )
      qkv = out = bool(hf.get("attention_bias", False))
      mlp = bool(hf.get("mlp_bias", False))
    d_head = hf.get("head_dim")
    if d_head == hf["hidden_size"] // hf["num_attention_heads"]:
      d_head = None  # derived: the config stays what the same model built natively has
    return ModelConfig.llama(
      vocab_size=hf["vocab_size"],
      d_model=hf["hidden_size"],
      n_layers=hf["num_hidden_layers"],
      n_heads=hf["num_attention_heads"],
      n_kv_heads=hf.get("num_key_value_heads"),
      d_head=d_head,
      d_ff=hf["intermediate_size"],
      max_len=hf["max_position_embeddings"],
      norm_eps=hf.get("rms_norm_eps", 1e-6),
      mlp=LLAMA_ACTS[act],
      tie_embeddings=hf.get("tie_word_embeddings", False),
      qkv_bias=qkv,
      attn_out_bias=out,
      mlp_bias=mlp,
      dropout=0.0,
      **_rope_fields(hf, path),
    )
  except KeyError as e:
    raise HFError(f"{path}: field {e.args[0]} is missing") from None


def architecture(c: ModelConfig) -> str:
  """The HF architecture that expresses ``c`` exactly; HFError if none does."""
  why = None
  if c.family != "decoder" or c.n_experts:
    why = f"model.family={c.family!r}, model.n_experts={c.n_experts}"
  elif c.norm == "layernorm":
    gpt2 = dict(
      position="learned",
      mlp=("gelu", "gelu_exact", "relu"),
      d_head=None,
      n_kv_heads=(None, c.n_heads),
      use_bias=True,
      qkv_bias=(None, True),
      attn_out_bias=(None, True),
      mlp_bias=(None, True),
    )
    bad = [k for k, v in gpt2.items() if getattr(c, k) not in (v if isinstance(v, tuple) else (v,))]
    if not bad:
      return "GPT2LMHeadModel"
    why = ", ".join(f"model.{k}={getattr(c, k)!r}" for k in bad)
  elif c.position != "rope" or c.mlp not in GATED_MLPS:
    why = f"model.position={c.position!r}, model.mlp={c.mlp!r}"
  elif c.bias("qkv") == c.bias("attn_out"):
    return "LlamaForCausalLM"
  elif c.bias("qkv") and not c.bias("attn_out") and not c.bias("mlp"):
    return "Qwen2ForCausalLM"
  else:
    why = f"model.qkv_bias={c.bias('qkv')}, model.attn_out_bias={c.bias('attn_out')}"
  raise HFError(
    f"no Hugging Face architecture matches this model ({why}); export supports "
    "GPT-2 (layernorm, learned positions, biases) and LLaMA/Qwen2 (rmsnorm, rope, "
    "gated MLP)"
  )


def hf_config_from_model(c: ModelConfig, tokenizer: Any = None) -> dict[str, Any]:
  """The HF ``config.json`` dict of ``c`` (GPT-2 or LLaMA/Qwen2 shaped)."""
  arch = architecture(c)
  ids = {}
  if tokenizer is not None:
    ids = dict(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
  if arch == "GPT2LMHeadModel":
    act = {v: k for k, v in GPT2_ACTS.items() if k != "gelu_pytorch_tanh"}[c.mlp]
    return dict(
      architectures=[arch],
      model_type="gpt2",
      vocab_size=c.vocab_size,
      n_embd=c.d_model,
      n_layer=c.n_layers,
      n_head=c.n_heads,
      n_inner=c.d_ff,
      n_positions=c.max_len,
      layer_norm_epsilon=c.norm_eps,
      activation_function=act,
      tie_word_embeddings=c.tie_embeddings,
      resid_pdrop=0.0,
      embd_pdrop=0.0,
      attn_pdrop=0.0,
      torch_dtype="float32",
      **ids,
    )
  out = dict(
    architectures=[arch],
    model_type="qwen2" if arch.startswith("Qwen2") else "llama",
    vocab_size=c.vocab_size,
    hidden_size=c.d_model,
    intermediate_size=c.ff_dim,
    num_hidden_layers=c.n_layers,
    num_attention_heads=c.n_heads,
    num_key_value_heads=c.kv_heads,
    head_dim=c.head_dim,
    max_position_embeddings=c.max_len,
    rms_norm_eps=c.norm_eps,
    hidden_act={"swiglu": "silu", "geglu": "gelu_pytorch_tanh"}[c.mlp],
    tie_word_embeddings=c.tie_embeddings,
    rope_theta=c.rope_theta,
    attention_dropout=0.0,
    torch_dtype="float32",
    **ids,
  )
  if arch == "LlamaForCausalLM":
    out.update(attention_bias=c.bias("qkv"), mlp_bias=c.bias("mlp"))
  else:
    out.update(use_sliding_window=False)
  if c.rope_scaling != "none":
    scaling = {"rope_type": c.rope_scaling, "factor": c.rope_factor}
    if c.rope_scaling == "llama3":
      scaling.update(
        low_freq_factor=c.rope_low_freq_factor,
        high_freq_factor=c.rope_high_freq_factor,
        original_max_position_embeddings=c.rope_original_max_len,
      )
    out["rope_scaling"] = scaling
  return out


# ----------------------------------------------------------------------------- weights
# Each layout is a list of (llm_mp path, HF name, to_llm_mp, to_hf): the conversions
# reshape/transpose one tensor; GPT-2's fused c_attn is three entries slicing one tensor.


def describe(config: Config) -> str:
  """One line: the architecture and size of an imported model."""
  c = config.model
  return (
    f"{architecture(c)}: {c.n_layers} layers, d_model {c.d_model}, {c.n_heads} heads "
    f"({c.kv_heads} kv, head dim {c.head_dim}), vocab {c.vocab_size}, "
    f"max_len {c.max_len}"
    + (f", rope {c.rope_scaling} x{c.rope_factor}" if c.rope_scaling != "none" else "")
  )
