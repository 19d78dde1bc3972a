"""Hugging Face checkpoints in and out: GPT-2 and the LLaMA family.

:func:`import_hf` reads a directory in the HF layout (``config.json``,
``model.safetensors`` or shards with ``model.safetensors.index.json``,
``tokenizer.json`` and optionally ``tokenizer_config.json``) and returns
``(config, params, tokenizer)``; :func:`write_run` turns those into an llm_mp
run directory (config, tokenizer, a step-0 checkpoint) that ``generate``,
``eval`` and ``train --init-from`` use; :func:`export_hf` writes the reverse,
loadable by ``transformers``' ``from_pretrained``. Export then import is bit
exact (fp32 in, fp32 out).

Supported: ``GPT2LMHeadModel`` (fused ``c_attn``, ``Conv1D`` weights stored
``[in, out]``, learned positions, tied head) and ``LlamaForCausalLM`` /
``MistralForCausalLM`` / ``Qwen2ForCausalLM`` (GQA, RoPE with ``linear`` or
``llama3`` scaling, explicit ``head_dim``, tied or untied head, attention and
MLP biases; Qwen2's q/k/v-only biases). ``torch.nn.Linear`` weights are stored
``[out, in]``, hence the transposes below. Parameters are imported in fp32
(bf16/fp16 checkpoints are widened exactly); the run's precision policy casts
them as it does any run's.

Every problem (unsupported architecture, a missing file or tensor, a shape or
dtype that does not match ``config.json``) is one ``ValueError`` line naming
the file and the field or tensor; nothing is written before all checks pass.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import struct
from collections.abc import Callable
from typing import Any

import ml_dtypes
import numpy as np

from llm_mp.config import Config, DataConfig, ModelConfig, OptimConfig, TrainConfig
from llm_mp.data.tokenizer import (
  TOKENIZER_FILE,
  BpeTokenizer,
  ByteTokenizer,
  HFTokenizer,
  read_specials,
)
from llm_mp.formats import require_float_weights
from llm_mp.model_config import GATED_MLPS
from llm_mp.rundir import load_run, publish_directory, staging_directory

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
LLAMA_ARCHS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
ARCHS = ("GPT2LMHeadModel",) + LLAMA_ARCHS
# HF activation names -> llm_mp's two-layer MLP (GPT-2) or gated MLP (LLaMA family).
GPT2_ACTS = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu": "gelu_exact", "relu": "relu"}
LLAMA_ACTS = {"silu": "swiglu", "gelu_pytorch_tanh": "geglu"}
SAFETENSORS_DTYPES = {
  "F64": np.float64,
  "F32": np.float32,
  "F16": np.float16,
  "BF16": ml_dtypes.bfloat16,
}


class HFError(ValueError):
  """An HF directory llm_mp cannot import, or a run it cannot export."""


# ----------------------------------------------------------------------------- files


def _read_json(path: str) -> dict[str, Any]:
  if not os.path.isfile(path):
    raise HFError(f"{path}: file not found")
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except ValueError as e:
    raise HFError(f"{path}: not valid JSON ({e})") from None


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of one ``.safetensors`` file (any float dtype, bf16 included).

  The format is an 8-byte little-endian header length, a JSON header of
  ``{name: {dtype, shape, data_offsets}}`` and the raw bytes; read here
  directly because ``safetensors.numpy`` has no bfloat16.
  """
  if not os.path.isfile(path):
    raise HFError(f"{path}: file not found")
  with open(path, "rb") as f:
    raw = f.read()
  try:
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
  except (struct.error, ValueError) as e:
    raise HFError(f"{path}: not a safetensors file ({e})") from None
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in SAFETENSORS_DTYPES:
      raise HFError(
        f"{path}: tensor {name} has dtype {info['dtype']}, expected one of "
        f"{list(SAFETENSORS_DTYPES)}"
      )
    start, end = info["data_offsets"]
    data = raw[8 + n + start : 8 + n + end]
    if len(data) != end - start:
      raise HFError(
        f"{path}: truncated: tensor {name} needs bytes {start}..{end} of the data, the "
        f"file has {len(raw) - 8 - n} (an interrupted download? fetch it again)"
      )
    out[name] = np.frombuffer(data, SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])
  return out


def read_weights(src: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """``(tensors, files)``: every tensor of ``src``'s single or sharded safetensors,
  and the file each came from (for errors)."""
  index = os.path.join(src, INDEX_FILE)
  if os.path.isfile(index):
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
      raise HFError(f"{index}: field weight_map is missing")
    shards = sorted(set(weight_map.values()))
  elif os.path.isfile(os.path.join(src, WEIGHTS_FILE)):
    shards = [WEIGHTS_FILE]
  else:
    other = [n for n in ("pytorch_model.bin", "model.bin") if os.path.isfile(os.path.join(src, n))]
    hint = f" ({other[0]} is not supported: save with safe_serialization=True)" if other else ""
    raise HFError(f"{os.path.join(src, WEIGHTS_FILE)}: file not found{hint}")
  tensors, files = {}, {}
  for shard in shards:
    path = os.path.join(src, shard)
    for name, x in _read_safetensors(path).items():
      tensors[name], files[name] = x, path
  return tensors, files


# ----------------------------------------------------------------------------- configs


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


def _arch(c: ModelConfig) -> str:
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
  arch = _arch(c)
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


def _linear(shape_in: tuple[int, ...], shape_out: tuple[int, ...]):
  """torch Linear ``[out, in]`` <-> llm_mp kernel ``[*shape_in, *shape_out]``."""
  return (
    lambda w: w.T.reshape(shape_in + shape_out),
    lambda k: k.reshape(int(np.prod(shape_in)), -1).T,
  )


def _conv1d(shape_in: tuple[int, ...], shape_out: tuple[int, ...]):
  """GPT-2 Conv1D ``[in, out]`` <-> llm_mp kernel ``[*shape_in, *shape_out]``."""
  return (
    lambda w: w.reshape(shape_in + shape_out),
    lambda k: k.reshape(int(np.prod(shape_in)), -1),
  )


def _reshape(shape: tuple[int, ...]):
  return (lambda w: w.reshape(shape), lambda k: k.reshape(-1))


_SAME = (lambda w: w, lambda k: k)


def _layout(c: ModelConfig) -> list[tuple[str, str, Any, Any, tuple[int, ...]]]:
  """``(llm_mp path, HF name, to_llm_mp, to_hf, HF shape)`` for every tensor of ``c``."""
  d, n, k, h, f = c.d_model, c.n_heads, c.kv_heads, c.head_dim, c.ff_dim
  rows = []

  def add(path, name, conv, shape):
    rows.append((path, name, conv[0], conv[1], tuple(shape)))

  if _arch(c) == "GPT2LMHeadModel":
    add("embed/embedding", "transformer.wte.weight", _SAME, (c.vocab_size, d))
    add("pos_embed/pos_embedding", "transformer.wpe.weight", _SAME, (c.max_len, d))
    for i in range(c.n_layers):
      p, q = f"decoder/blocks_{i}", f"transformer.h.{i}"
      for j, proj in enumerate(("query", "key", "value")):
        # c_attn is [d, 3d] = [q | k | v] along its output axis.
        sl = slice(j * d, (j + 1) * d)
        add(
          f"{p}/attn/{proj}/kernel",
          f"{q}.attn.c_attn.weight#{j}",
          (lambda w, sl=sl: w[:, sl].reshape(d, n, h), lambda x: x.reshape(d, d)),
          (d, 3 * d),
        )
        add(
          f"{p}/attn/{proj}/bias",
          f"{q}.attn.c_attn.bias#{j}",
          (lambda w, sl=sl: w[sl].reshape(n, h), lambda x: x.reshape(d)),
          (3 * d,),
        )
      add(f"{p}/attn/out/kernel", f"{q}.attn.c_proj.weight", _conv1d((n, h), (d,)), (d, d))
      add(f"{p}/attn/out/bias", f"{q}.attn.c_proj.bias", _SAME, (d,))
      for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
        add(f"{p}/{ours}/scale", f"{q}.{theirs}.weight", _SAME, (d,))
        add(f"{p}/{ours}/bias", f"{q}.{theirs}.bias", _SAME, (d,))
      add(f"{p}/mlp/up/kernel", f"{q}.mlp.c_fc.weight", _conv1d((d,), (f,)), (d, f))
      add(f"{p}/mlp/up/bias", f"{q}.mlp.c_fc.bias", _SAME, (f,))
      add(f"{p}/mlp/down/kernel", f"{q}.mlp.c_proj.weight", _conv1d((f,), (d,)), (f, d))
      add(f"{p}/mlp/down/bias", f"{q}.mlp.c_proj.bias", _SAME, (d,))
    add("final_norm/scale", "transformer.ln_f.weight", _SAME, (d,))
    add("final_norm/bias", "transformer.ln_f.bias", _SAME, (d,))
    if not c.tie_embeddings:
      add("lm_head/kernel", "lm_head.weight", _linear((d,), (c.vocab_size,)), (c.vocab_size, d))
    return rows
  add("embed/embedding", "model.embed_tokens.weight", _SAME, (c.vocab_size, d))
  for i in range(c.n_layers):
    p, q = f"decoder/blocks_{i}", f"model.layers.{i}"
    for proj, name, heads in (("query", "q_proj", n), ("key", "k_proj", k), ("value", "v_proj", k)):
      add(
        f"{p}/attn/{proj}/kernel",
        f"{q}.self_attn.{name}.weight",
        _linear((d,), (heads, h)),
        (heads * h, d),
      )
      if c.bias("qkv"):
        add(
          f"{p}/attn/{proj}/bias", f"{q}.self_attn.{name}.bias", _reshape((heads, h)), (heads * h,)
        )
    add(f"{p}/attn/out/kernel", f"{q}.self_attn.o_proj.weight", _linear((n, h), (d,)), (d, n * h))
    if c.bias("attn_out"):
      add(f"{p}/attn/out/bias", f"{q}.self_attn.o_proj.bias", _SAME, (d,))
    add(f"{p}/attn_norm/scale", f"{q}.input_layernorm.weight", _SAME, (d,))
    add(f"{p}/mlp_norm/scale", f"{q}.post_attention_layernorm.weight", _SAME, (d,))
    for ours, theirs, shape_in, shape_out in (
      ("gate", "gate_proj", d, f),
      ("up", "up_proj", d, f),
      ("down", "down_proj", f, d),
    ):
      add(
        f"{p}/mlp/{ours}/kernel",
        f"{q}.mlp.{theirs}.weight",
        _linear((shape_in,), (shape_out,)),
        (shape_out, shape_in),
      )
      if c.bias("mlp"):
        add(f"{p}/mlp/{ours}/bias", f"{q}.mlp.{theirs}.bias", _SAME, (shape_out,))
  add("final_norm/scale", "model.norm.weight", _SAME, (d,))
  if not c.tie_embeddings:
    add("lm_head/kernel", "lm_head.weight", _linear((d,), (c.vocab_size,)), (c.vocab_size, d))
  return rows


# Buffers some checkpoints carry that are not parameters (recomputed by the model).
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


def params_from_hf(
  c: ModelConfig, tensors: dict[str, np.ndarray], files: dict[str, str] | None = None
) -> dict[str, Any]:
  """llm_mp parameters (nested dicts of float32 numpy arrays, unscanned layout) of HF tensors.

  GPT-2 names with or without the ``transformer.`` prefix are accepted.

  Raises:
    HFError: a tensor is missing, unexpected, or has the wrong shape or dtype.
  """
  files = files or {}
  named = dict(tensors)
  for name in list(named):  # the original GPT-2 checkpoints lack the prefix
    if name.split(".")[0] in ("wte", "wpe", "h", "ln_f"):
      named["transformer." + name] = named.pop(name)
      files["transformer." + name] = files.get(name, WEIGHTS_FILE)
  if c.tie_embeddings:
    named.pop("lm_head.weight", None)  # some tied checkpoints store the copy too
  used, flat = set(), {}
  for path, name, to_ours, _, shape in _layout(c):
    key = name.split("#")[0]
    where = files.get(key, WEIGHTS_FILE)
    if key not in named:
      raise HFError(f"{where}: tensor {key} is missing (expected shape {list(shape)})")
    x = named[key]
    if tuple(x.shape) != shape:
      raise HFError(
        f"{where}: tensor {key} has shape {list(x.shape)} but {CONFIG_FILE} implies {list(shape)}"
      )
    if not np.issubdtype(x.dtype, np.floating) and x.dtype != ml_dtypes.bfloat16:
      raise HFError(f"{where}: tensor {key} has dtype {x.dtype}, expected a float")
    flat[path] = np.ascontiguousarray(to_ours(np.asarray(x, np.float32)))
    used.add(key)
  extra = sorted(k for k in named if k not in used and not k.endswith(_IGNORED_SUFFIXES))
  if extra:
    raise HFError(
      f"{files.get(extra[0], WEIGHTS_FILE)}: unexpected tensor {extra[0]} "
      f"({len(extra)} unexpected; an architecture llm_mp does not model)"
    )
  pad = c.padded_vocab - c.vocab_size  # model.vocab_multiple: zero rows, masked in the logits
  if pad:
    flat["embed/embedding"] = np.pad(flat["embed/embedding"], ((0, pad), (0, 0)))
    if "lm_head/kernel" in flat:
      flat["lm_head/kernel"] = np.pad(flat["lm_head/kernel"], ((0, 0), (0, pad)))
  return _unflatten(flat)


def params_to_hf(c: ModelConfig, params: Any) -> dict[str, np.ndarray]:
  """HF tensors (float32 numpy, ``[out, in]`` Linear / ``[in, out]`` Conv1D) of llm_mp params."""
  flat = _flatten(_unscan(c, params))
  # A padded vocabulary (model.vocab_multiple) leaves its padding rows behind.
  flat["embed/embedding"] = np.asarray(flat["embed/embedding"])[: c.vocab_size]
  if "lm_head/kernel" in flat:
    flat["lm_head/kernel"] = np.asarray(flat["lm_head/kernel"])[:, : c.vocab_size]
  out: dict[str, Any] = {}
  for path, name, _, to_hf, _shape in _layout(c):
    x = to_hf(np.asarray(flat[path], np.float32))
    key, _, part = name.partition("#")
    if part:  # a slice of GPT-2's fused c_attn along its output axis
      out.setdefault(key, {})[int(part)] = x
    else:
      out[key] = x
  for key, parts in out.items():
    if isinstance(parts, dict):
      out[key] = np.concatenate([parts[j] for j in range(3)], axis=-1)
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict) or hasattr(v, "items"):
      out.update(_flatten(v, f"{prefix}{k}/"))
    else:
      out[f"{prefix}{k}"] = v
  return out


def _unflatten(flat: dict[str, Any]) -> dict[str, Any]:
  out: dict[str, Any] = {}
  for path, x in flat.items():
    node = out
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = x
  return out


def _unscan(c: ModelConfig, params: Any) -> Any:
  """``params`` with a scanned ``decoder/blocks/block`` stack split into ``blocks_i``."""
  params = dict(params)
  decoder = dict(params["decoder"])
  if "blocks" in decoder:
    stacked = _flatten(decoder.pop("blocks")["block"])
    for i in range(c.n_layers):
      decoder[f"blocks_{i}"] = _unflatten({k: np.asarray(v)[i] for k, v in stacked.items()})
  params["decoder"] = decoder
  return params


# ----------------------------------------------------------------------------- tokenizers


def load_hf_tokenizer(src: str, hf_config: dict[str, Any]) -> BpeTokenizer:
  """``src/tokenizer.json`` with its own specials: named by ``tokenizer_config.json``
  (bos/eos/pad_token), else by ``config.json``'s ``bos/eos/pad_token_id``.

  A missing pad is the eos token (GPT-2 has no pad: padded positions never
  reach the loss, so any id works, and eos keeps the vocabulary unchanged).
  """
  path = os.path.join(src, TOKENIZER_FILE)
  if not os.path.isfile(path):
    raise HFError(f"{path}: file not found")
  try:
    hf = HFTokenizer.from_file(path)
  except Exception as e:  # pylint: disable=broad-except  # HF raises plain Exception
    raise HFError(f"{path}: not a tokenizer ({type(e).__name__}: {e})") from None
  specials = read_specials(src, hf)
  if specials is None:
    cfg = os.path.join(src, CONFIG_FILE)
    eos_id = hf_config.get("eos_token_id")
    if isinstance(eos_id, list):  # LLaMA 3 instruct lists several; the first ends a turn
      eos_id = eos_id[0]
    if eos_id is None:
      raise HFError(
        f"{cfg}: field eos_token_id is missing (and {src} has no "
        "tokenizer_config.json naming eos_token)"
      )
    bos_id = hf_config.get("bos_token_id", eos_id)
    pad_id = hf_config.get("pad_token_id", eos_id)
    names = []
    for field, i in (("pad_token_id", pad_id), ("bos_token_id", bos_id), ("eos_token_id", eos_id)):
      token = hf.id_to_token(int(i)) if i is not None else hf.id_to_token(int(eos_id))
      if token is None:
        raise HFError(f"{cfg}: field {field}={i} is not in {path}'s vocabulary")
      names.append(token)
    specials = tuple(names)
  return BpeTokenizer(hf, specials)


# ----------------------------------------------------------------------------- import / export


def _resolve_source(src: str) -> str:
  if os.path.isdir(src):
    return src
  if os.path.exists(src) or src.count("/") > 1:
    raise HFError(f"{src}: not a directory")
  try:
    from huggingface_hub import snapshot_download  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise HFError(f"{src}: no such directory (hub names need huggingface_hub installed)") from None
  return snapshot_download(src, allow_patterns=["*.json", "*.safetensors"])


def import_hf(src: str, vocab_multiple: int = 1) -> tuple[Config, dict[str, Any], BpeTokenizer]:
  """Reads an HF GPT-2 or LLaMA-family checkpoint.

  Args:
    src: a directory in the HF layout (or a hub model name, when
      ``huggingface_hub`` is installed and the machine is online).
    vocab_multiple: pad the vocabulary to a multiple of this (e.g. 50257 ->
      50304 with 128, for faster matmuls); the padded rows are zero and their
      logits are masked, so the loss and sampling are unchanged.

  Returns:
    ``(config, params, tokenizer)``: a :class:`Config` whose model section is
    the checkpoint's (fine-tuning defaults elsewhere: fp32, BPE data with this
    tokenizer), the parameters as nested dicts of float32 numpy arrays in
    llm_mp's unscanned layout (``model.apply({"params": params}, tokens)``
    gives the HF model's logits), and the tokenizer with the checkpoint's own
    special tokens.

  Raises:
    HFError: an unsupported architecture, missing file or tensor, or a
      shape/dtype mismatch (one line naming the file and field).
  """
  src = _resolve_source(src)
  cfg_path = os.path.join(src, CONFIG_FILE)
  hf_config = _read_json(cfg_path)
  model = dataclasses.replace(
    model_config_from_hf(hf_config, cfg_path), vocab_multiple=vocab_multiple
  )
  tokenizer = load_hf_tokenizer(src, hf_config)
  if tokenizer.vocab_size > model.vocab_size:
    raise HFError(
      f"{os.path.join(src, TOKENIZER_FILE)}: vocabulary of {tokenizer.vocab_size} "
      f"exceeds {cfg_path} field vocab_size={model.vocab_size}"
    )
  tensors, files = read_weights(src)
  params = params_from_hf(model, tensors, files)
  seq_len = min(model.max_len, 1024)
  config = Config(
    model=model,
    optim=OptimConfig(lr=1e-4, warmup_steps=10, weight_decay=0.0),
    data=DataConfig(tokenizer="bpe", bpe_vocab_size=tokenizer.vocab_size, seq_len=seq_len),
    train=TrainConfig(steps=100, batch_size=8, log_every=10, eval_every=50, ckpt_every=100),
  )
  return config, params, tokenizer


def export_hf(source: str | tuple[Config | ModelConfig, Any, Any], out_dir: str) -> None:
  """Writes ``out_dir`` as an HF checkpoint: ``config.json``, ``model.safetensors``
  (float32), ``tokenizer.json`` and ``tokenizer_config.json``.

  Args:
    source: a run directory (its latest checkpoint's parameters), or
      ``(config, params, tokenizer)`` as :func:`import_hf` returns.
    out_dir: a new or empty directory.

  Raises:
    HFError: the model has no HF architecture (e.g. an encoder, MoE, or
      sinusoidal positions), the tokenizer is not a BPE one, or ``out_dir``
      is not empty; nothing is written then.
  """
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel

  if isinstance(source, str):
    run = load_run(source)
    require_float_weights(run.precision, source, "export-hf")
    config, params, tokenizer = run.config, run.params, run.tokenizer
  else:
    config, params, tokenizer = source
  model = config.model if isinstance(config, Config) else config
  if isinstance(tokenizer, ByteTokenizer):
    raise HFError(
      "tokenizer: a byte tokenizer has no tokenizer.json for transformers; "
      "export runs trained with data.tokenizer='bpe'"
    )
  hf_config = hf_config_from_model(model, tokenizer)
  tensors = params_to_hf(model, params)
  tmp = staging_directory(out_dir)
  try:
    with open(os.path.join(tmp, CONFIG_FILE), "w", encoding="utf-8") as f:
      json.dump(hf_config, f, indent=2, sort_keys=True)
    save_file(tensors, os.path.join(tmp, WEIGHTS_FILE), metadata={"format": "pt"})
    if tokenizer.specials is None:
      tokenizer = BpeTokenizer(
        tokenizer.hf,
        (
          tokenizer.hf.id_to_token(tokenizer.pad_id),
          tokenizer.hf.id_to_token(tokenizer.bos_id),
          tokenizer.hf.id_to_token(tokenizer.eos_id),
        ),
      )
    tokenizer.save(tmp)
    publish_directory(tmp, out_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def describe(config: Config) -> str:
  """One line: the architecture and size of an imported model."""
  c = config.model
  return (
    f"{_arch(c)}: {c.n_layers} layers, d_model {c.d_model}, {c.n_heads} heads "
    f"({c.kv_heads} kv, head dim {c.head_dim}), vocab {c.vocab_size}, "
    f"max_len {c.max_len}"
    + (f", rope {c.rope_scaling} x{c.rope_factor}" if c.rope_scaling != "none" else "")
  )


__all__ = [
  "HFError",
  "export_hf",
  "hf_config_from_model",
  "import_hf",
  "model_config_from_hf",
  "params_from_hf",
  "params_to_hf",
]
