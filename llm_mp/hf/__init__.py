"""Hugging Face checkpoints in and out: GPT-2 and the LLaMA family.

:func:`import_hf` reads a directory in the HF layout (``config.json``,
``model.safetensors`` or shards with ``model.safetensors.index.json``,
``tokenizer.json`` and optionally ``tokenizer_config.json``) and returns
``(config, params, tokenizer)``; :func:`llm_mp.rundir.write_run` turns those into an llm_mp
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
from typing import Any

from llm_mp.config import Config, DataConfig, ModelConfig, OptimConfig, TrainConfig
from llm_mp.data.tokenizer import (
  TOKENIZER_FILE,
  BpeTokenizer,
  ByteTokenizer,
  HFTokenizer,
  read_specials,
)
from llm_mp.formats import require_float_weights
from llm_mp.hf.config import describe, hf_config_from_model, model_config_from_hf
from llm_mp.hf.files import (
  CONFIG_FILE,
  INDEX_FILE,
  WEIGHTS_FILE,
  HFError,
  read_json,
  read_weights,
)
from llm_mp.hf.weights import params_from_hf, params_to_hf
from llm_mp.rundir import load_run, publish_directory, staging_directory


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
  hf_config = read_json(cfg_path)
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
      sinusoidal positions) or ``out_dir`` is not empty; nothing is written
      then. A byte tokenizer is written as a byte-level BPE with the same ids.
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
    tokenizer = tokenizer.as_bpe()  # the same ids, in a form transformers reads
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


__all__ = [
  "CONFIG_FILE",
  "INDEX_FILE",
  "WEIGHTS_FILE",
  "HFError",
  "describe",
  "export_hf",
  "hf_config_from_model",
  "import_hf",
  "load_hf_tokenizer",
  "model_config_from_hf",
  "params_from_hf",
  "params_to_hf",
  "read_weights",
]
