"""The benchmark module's CPU path: builds a preset, times llm_mp's train_step, prints JSON."""

import json

from experiments import benchmark


def test_benchmark_prints_json_with_the_reported_fields(capsys):
  code = benchmark.main(["--preset", "nanogpt_cpu", "--precision", "fp32", "--steps", "2",
                         "--warmup", "1", "model.n_layers=1", "train.batch_size=2"])
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert code == 0
  for key in ("tokens_per_s", "ms_per_step", "ms_per_step_min", "tflops_per_s", "mfu_spec",
              "peak_mem_gb", "precision", "attention", "device", "jax", "loss"):
    assert key in result
  assert result["tokens_per_s"] > 0 and result["batch"] == 2 and result["seq_len"] == 64
  # tokens/s and ms/step describe the same median step.
  assert abs(result["tokens_per_s"] * result["ms_per_step"] / 1e3 - 2 * 64) < 1
