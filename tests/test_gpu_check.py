"""experiments.gpu_check: its CPU dry run (the GPU job's plumbing) and its HLO reading."""

import json

import pytest

from experiments import gpu_check
from llm_mp import benchmark

FAKE_RUN = dict(ms_per_step=10.0, tokens_per_s=1000.0, mfu_spec=0.5, loss=5.0, device="cpu")


def test_hlo_gemms_counts_fp8_gemms_custom_calls_and_dots():
  hlo = (
    "%a = f8e4m3fn[16,32]{1,0} convert(%x)\n"
    '%g = (bf16[16,16], s8[0]) custom-call(%a, %b), custom_call_target="__cublas$lt$matmul$f8"\n'
    "%c = bf16[4,4]{1,0} dot(%p, %q), lhs_contracting_dims={1}\n"
    '%h = (bf16[4,4]) custom-call(%p), custom_call_target="__cudnn$fmhaSoftmax"\n'
  )
  assert gpu_check.hlo_gemms(hlo) == {
    "fp8_gemms": 1,
    "custom_calls": {"__cublas$lt$matmul$f8": 1, "__cudnn$fmhaSoftmax": 1},
    "dots": 1,
    "f8_values": 1,
  }


def test_dry_run_writes_every_part_and_the_targets(monkeypatch, tmp_path):
  # The benchmark and the init timing are faked (tests/test_benchmark.py times the real
  # step); the fp8 step's HLO is compiled for real on the one-layer tiny model.
  runs = []
  monkeypatch.setattr(benchmark, "run", lambda *a, **k: runs.append(a[:3]) or dict(FAKE_RUN))
  monkeypatch.setattr(gpu_check, "time_to_first_step", lambda config: {"init_s": 4.0})
  argv = ["--out", str(tmp_path), "--cpu-dry-run", "--parts", "gpt2_124m,init,llama_1b"]
  assert gpu_check.main(argv) == 0
  results = json.loads((tmp_path / "results.json").read_text())
  assert [r[:2] for r in runs] == [
    ("tiny", "bf16"),
    ("tiny", "fp16"),
    ("tiny", "bf16"),
    ("tiny", "bf16"),
  ]
  assert runs[-1][2][-len(gpu_check.DRY_OVERRIDES) - 2 :][:2] == gpu_check.FP8
  assert results["reference"] == {"skipped": "no torch or no ../shared/bench/torch_gpt.py"}
  assert results["llama_1b_fp8_hlo"]["fp8_gemms"] == 0  # no fp8 GEMMs on a CPU
  table = (tmp_path / "results.md").read_text()
  assert "| 124M fp16 within 3% of bf16 | 1.000x | yes |" in table
  assert "| 124M init <= 5 s | 4.0 s | yes |" in table
  assert "| 124M bf16 >= 1.15x reference | - | - |" in table


def test_a_failing_part_is_recorded_and_the_next_runs(monkeypatch, tmp_path):
  def fail(*a, **k):
    raise RuntimeError("no cuDNN")

  monkeypatch.setattr(benchmark, "run", fail)
  monkeypatch.setattr(gpu_check, "time_to_first_step", lambda config: {"init_s": 9.0})
  argv = ["--out", str(tmp_path), "--cpu-dry-run", "--parts", "gpt2_350m,init"]
  assert gpu_check.main(argv) == 1
  results = json.loads((tmp_path / "results.json").read_text())
  assert results["error_gpt2_350m"] == "RuntimeError: no cuDNN"
  assert results["init"] == {"init_s": 9.0}


@pytest.mark.slow
def test_whole_dry_run_on_cpu(tmp_path):
  # Every part for real on the one-layer tiny model: about 40 s of CPU.
  assert gpu_check.main(["--out", str(tmp_path), "--cpu-dry-run"]) == 0
  results = json.loads((tmp_path / "results.json").read_text())
  assert results["tests"]["rc"] == 0
  assert {"gpt2_124m_bf16", "gpt2_124m_fp16", "llama_1b_fp8", "gpt2_350m_bf16"} <= set(results)
  assert results["init"]["first_step_s"] > 0
