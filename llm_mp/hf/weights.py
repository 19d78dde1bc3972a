"""Hugging Face tensors <-> llm_mp parameters: names, layouts (Conv1D ``[in, out]``,
``nn.Linear`` ``[out, in]``), fused and split projections, scanned stacks."""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

from llm_mp.config import ModelConfig
from llm_mp.hf.config import architecture
from llm_mp.hf.files import CONFIG_FILE, WEIGHTS_FILE, HFError


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

  if architecture(c) == "GPT2LMHeadModel":
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
  flat = _flatten(unscan(c, params))
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


def unscan(c: ModelConfig, params: Any) -> Any:
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
