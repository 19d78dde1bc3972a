"""The files of a Hugging Face checkpoint: config.json, safetensors (one file or shards)."""

from __future__ import annotations

import json
import os
import struct
from typing import Any

import ml_dtypes
import numpy as np

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


def read_json(path: str) -> dict[str, Any]:
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
    weight_map = read_json(index).get("weight_map")
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
