"""Train-step throughput benchmark; prints JSON.

Times llm_mp's own ``train_step`` (the code users train with) on one fixed
batch of random tokens (numpy seed 0, as ``shared/bench/torch_gpt.py``), after
warm-up, with a device sync per step, and reports min and median ms/step,
tokens/s, MFU with the reference's formula, peak device memory, precision,
attention implementation, device and jax version.

  python -m experiments.benchmark                         # GPT-2 124M on the GPU, bf16
  python -m experiments.benchmark --preset nanogpt_cpu --precision fp32   # CPU reference
  python -m experiments.benchmark --preset llama_1b --precision bf16 model.remat=dots

Expected: on an H100, bf16 >= 1.15x the torch.compile reference tokens/s;
on 2 CPU cores, nanogpt_cpu fp32 at least as fast as torch eager (see
docs/benchmarks.md for measured figures, dates and commands).

On CPU, XLA allocates a step's temporaries as one block per call (44 MiB for
nanogpt_cpu). glibc hands blocks above its mmap threshold (at most 32 MiB
unless set) back to the kernel on free, so every step page-faults the whole
block in again: ~11k faults and ~20 ms of system time per nanogpt_cpu step.
Raising the thresholds keeps the block in the heap; the JSON records them:

  MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=1073741824 \
      python -m experiments.benchmark --preset nanogpt_cpu --precision fp32
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
import jax.numpy as jnp
import numpy as np

from llm_mp.builder import build_recipe
from llm_mp.config import PRESETS, apply_overrides, get_preset
from llm_mp.metrics import flops_per_token, params_without_positions
from llm_mp.state import make_init_fn, param_count
from llm_mp.step import make_train_step

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 spec
MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")  # glibc, see the docstring


def peak_flops(device) -> float | None:
  kind = getattr(device, "device_kind", "")
  for name, tflops in PEAK_TFLOPS.items():
    if name in kind:
      return tflops * 1e12
  return None


def fixed_batch(batch: int, seq: int, vocab: int) -> dict[str, jax.Array]:
  """One batch of random tokens, numpy seed 0 (the reference's data), one
  document per row."""
  tokens = np.random.default_rng(0).integers(0, vocab, (batch, seq + 1))
  return {"inputs": jnp.asarray(tokens[:, :-1], jnp.int32),
          "targets": jnp.asarray(tokens[:, 1:], jnp.int32),
          "segment_ids": jnp.ones((batch, seq), jnp.int32),
          "positions": jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))}


def run(preset: str, precision: str, overrides: Sequence[str], steps: int, warmup: int,
        repeats: int = 1) -> dict:
  """Builds the preset, times ``steps`` train steps ``repeats`` times; returns the JSON dict."""
  config = apply_overrides(get_preset(preset), list(overrides))
  config = dataclasses.replace(config, train=dataclasses.replace(config.train,
                                                                 precision=precision))
  r = build_recipe(config)
  state = jax.jit(make_init_fn(r.model, r.tx, r.precision, config))(jax.random.key(0))
  step = jax.jit(make_train_step(r.model, r.tx, r.schedule, config, r.task), donate_argnums=0)
  b, t = config.train.batch_size, config.data.seq_len
  batch = fixed_batch(b, t, config.model.vocab_size)
  for _ in range(warmup):
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(repeats):
    for _ in range(steps):
      t0 = time.perf_counter()
      state, metrics = step(state, batch)
      jax.block_until_ready(metrics["loss"])
      times.append(time.perf_counter() - t0)
  ms = statistics.median(times) * 1e3
  tokens_per_s = b * t / (ms / 1e3)
  device = jax.devices()[0]
  flops = flops_per_token(config.model, t, params_without_positions(state.params)) * tokens_per_s
  peak = peak_flops(device)
  stats = device.memory_stats() or {}
  return {
      "framework": "llm_mp", "preset": preset, "precision": precision,
      "attention": config.model.attention_impl, "remat": config.model.remat,
      "scan_layers": config.model.scan_layers, "batch": b, "seq_len": t,
      "tokens_per_s": round(tokens_per_s, 1), "ms_per_step": round(ms, 3),
      "ms_per_step_min": round(min(times) * 1e3, 3), "tflops_per_s": round(flops / 1e12, 3),
      "mfu_spec": round(flops / peak, 4) if peak else None,
      "peak_mem_gb": round(stats["peak_bytes_in_use"] / 2**30, 2)
                     if "peak_bytes_in_use" in stats else None,
      "loss": round(float(metrics["loss"]), 5), "params": param_count(state.params),
      "device": getattr(device, "device_kind", str(device)), "platform": device.platform,
      "jax": jax.__version__, "python": platform.python_version(),
      "malloc_env": {k: os.environ[k] for k in MALLOC_ENV if k in os.environ},
  }


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m experiments.benchmark",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--preset", default=None, choices=sorted(PRESETS),
                      help="model preset (default: gpt2_124m on GPU, nanogpt_cpu on CPU)")
  parser.add_argument("--precision", default=None, help="fp32, bf16, fp16, pure_bf16")
  parser.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
  parser.add_argument("--warmup", type=int, default=3, help="untimed steps (compilation)")
  parser.add_argument("--repeats", type=int, default=1)
  parser.add_argument("overrides", nargs="*", metavar="section.field=value")
  args = parser.parse_args(argv)
  on_gpu = jax.devices()[0].platform == "gpu"
  preset = args.preset or ("gpt2_124m" if on_gpu else "nanogpt_cpu")
  precision = args.precision or ("bf16" if on_gpu else "fp32")
  result = run(preset, precision, args.overrides, args.steps, args.warmup, args.repeats)
  print(json.dumps(result))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
