"""Train-step throughput of one config: times llm_mp's own ``train_step``; prints JSON.

Times the step users train with on one fixed batch of random tokens (numpy
seed 0, as the PyTorch reference ``shared/bench/torch_gpt.py``; the task's
``synthetic_batch``, so every preset's task), after
warm-up, with a device sync per step. Prints one line as each phase ends
(state init, compile, steps), then the JSON: min and median ms/step,
tokens/s, MFU with the reference's formula, init and compile seconds, peak
device memory, precision, attention implementation, device and versions.

  llm-mp bench                                      # GPT-2 124M bf16 on GPU, nanogpt_cpu on CPU
  llm-mp bench --preset llama_1b --precision bf16 model.remat=dots

The tables of docs/benchmarks.md (several presets against the reference) are
``python -m experiments.benchmark --suite gpu|cpu``.

On CPU, XLA allocates a step's temporaries as one block per call (44 MiB for
nanogpt_cpu). glibc hands blocks above its mmap threshold (at most 32 MiB
unless set) back to the kernel on free, so every step would page-fault the
whole block in again. :func:`tune_malloc` raises glibc's thresholds (what
``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` do) at the start of the
``llm-mp`` command and of this benchmark; the JSON records it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time
from typing import Sequence

import jax

from llm_mp.allocator import MALLOC_ENV, tune_malloc
from llm_mp.builder import build_recipe
from llm_mp.config import apply_overrides
from llm_mp.data import ByteTokenizer
from llm_mp.metrics import flops_per_token, params_without_positions
from llm_mp.presets import PRESETS, get_preset
from llm_mp.state import make_init_fn, param_count
from llm_mp.step import make_train_step
from llm_mp.tasks import task_spec

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 spec


def peak_flops(device) -> float | None:
  kind = getattr(device, "device_kind", "")
  for name, tflops in PEAK_TFLOPS.items():
    if name in kind:
      return tflops * 1e12
  return None


def _say(text: str) -> None:
  print(text, flush=True)


def run(
  preset: str,
  precision: str,
  overrides: Sequence[str],
  steps: int,
  warmup: int,
  repeats: int = 1,
  say=_say,
) -> dict:
  """Builds the preset, times ``steps`` train steps ``repeats`` times; returns the JSON dict.

  ``say`` receives one line as each phase ends (init, compile, warm-up, steps).
  """
  config = apply_overrides(get_preset(preset), list(overrides))
  config = dataclasses.replace(
    config, precision=dataclasses.replace(config.precision, policy=precision)
  )
  # The byte tokenizer's special ids stand in for a trained one's (mlm masks with them).
  r = build_recipe(config, ByteTokenizer())
  b, t = config.train.batch_size, config.data.seq_len
  batch = task_spec(config).synthetic_batch(config, b)
  t0 = time.perf_counter()
  state = jax.jit(make_init_fn(r.model, r.tx, config))(jax.random.key(0))
  jax.block_until_ready(state)
  init_s = time.perf_counter() - t0
  say(f"{preset} {precision}: state init {init_s:.2f} s ({param_count(state.params):,} params)")
  t0 = time.perf_counter()
  step = (
    jax.jit(make_train_step(r.model, r.tx, r.schedule, config, r.task), donate_argnums=0)
    .lower(state, batch)
    .compile()
  )
  compile_s = time.perf_counter() - t0
  say(f"{preset} {precision}: step compile {compile_s:.2f} s")
  for _ in range(warmup):
    state, _ = step(state, batch)
  jax.block_until_ready(state)
  times = []
  for _ in range(repeats):
    for _ in range(steps):
      t0 = time.perf_counter()
      state, metrics = step(state, batch)
      jax.block_until_ready(metrics["loss"])
      times.append(time.perf_counter() - t0)
  ms = statistics.median(times) * 1e3
  say(f"{preset} {precision}: {len(times)} steps, median {ms:.2f} ms/step")
  tokens_per_s = b * t / (ms / 1e3)
  device = jax.devices()[0]
  flops = flops_per_token(config.model, t, params_without_positions(state.params)) * tokens_per_s
  peak = peak_flops(device)
  stats = device.memory_stats() or {}
  return {
    "framework": "llm_mp",
    "preset": preset,
    "precision": precision,
    "attention": r.config.model.attention_impl,
    "remat": config.model.remat,
    "scan_layers": config.model.scan_layers,
    "batch": b,
    "seq_len": t,
    "tokens_per_s": round(tokens_per_s, 1),
    "ms_per_step": round(ms, 3),
    "ms_per_step_min": round(min(times) * 1e3, 3),
    "tflops_per_s": round(flops / 1e12, 3),
    "mfu_spec": round(flops / peak, 4) if peak else None,
    "init_s": round(init_s, 3),
    "compile_s": round(compile_s, 3),
    "peak_mem_gb": round(stats["peak_bytes_in_use"] / 2**30, 2)
    if "peak_bytes_in_use" in stats
    else None,
    "loss": round(float(metrics["loss"]), 5),
    "params": param_count(state.params),
    "device": getattr(device, "device_kind", str(device)),
    "platform": device.platform,
    "jax": jax.__version__,
    "python": platform.python_version(),
    "malloc_env": {k: os.environ[k] for k in MALLOC_ENV if k in os.environ},
    "malloc_tuned": tune_malloc(),
  }


def make_parser(prog: str = "llm-mp bench") -> argparse.ArgumentParser:
  """The options of one timing: ``--preset``, ``--precision``, ``--steps``,
  ``--warmup``, ``--repeats`` and ``section.field=value`` overrides."""
  parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
  parser.add_argument(
    "--preset",
    default=None,
    choices=sorted(PRESETS),
    help="model preset (default: gpt2_124m on GPU, nanogpt_cpu on CPU)",
  )
  parser.add_argument("--precision", default=None, help="fp32, bf16, fp16, pure_bf16")
  parser.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
  parser.add_argument("--warmup", type=int, default=3, help="untimed steps after compilation")
  parser.add_argument("--repeats", type=int, default=1)
  parser.add_argument("overrides", nargs="*", metavar="section.field=value")
  return parser


def run_args(args: argparse.Namespace) -> dict:
  """:func:`run` for options parsed by :func:`make_parser`; an unset preset or
  precision is the platform's default (gpt2_124m bf16 on GPU, nanogpt_cpu fp32 elsewhere)."""
  on_gpu = jax.devices()[0].platform == "gpu"
  preset = args.preset or ("gpt2_124m" if on_gpu else "nanogpt_cpu")
  precision = args.precision or ("bf16" if on_gpu else "fp32")
  return run(preset, precision, args.overrides, args.steps, args.warmup, args.repeats)


def main(argv: Sequence[str] | None = None) -> int:
  """``llm-mp bench``: times one preset; prints a line per phase, then the JSON."""
  tune_malloc()
  print(json.dumps(run_args(make_parser().parse_args(argv))))
  return 0
