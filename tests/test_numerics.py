"""Numerics diagnostics: format thresholds by hand, exponent histograms, the
probes' gradients in closed form, policy errors against float64, the CLI."""

import dataclasses
import json
import os

import chex
import compiled
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_mp import cli, format_ranges, numerics
from llm_mp.config import Config, DataConfig, ModelConfig, OptimConfig, PrecisionConfig, TrainConfig
from llm_mp.models import build_model
from llm_mp.precision import make_precision
from llm_mp.tasks import make_task
from llm_mp.train import train

# (smallest subnormal, smallest normal, max), written out from each format's bit layout.
HAND_RANGES = {
  "fp16": (2.0**-24, 2.0**-14, 65504.0),  # 5 exponent bits (bias 15), 10 mantissa bits
  "bf16": (2.0**-133, 2.0**-126, (2 - 2**-7) * 2.0**127),  # 8 exponent bits, 7 mantissa
  "fp8_e4m3": (2.0**-9, 2.0**-6, 448.0),  # bias 7, 3 mantissa bits; 1.111b x 2^8 is NaN
  "fp8_e5m2": (2.0**-16, 2.0**-14, 57344.0),  # bias 15, 2 mantissa bits
}
# ulp of the top binade: 2^(emax - mantissa bits).
HAND_ULP_MAX = {"fp16": 2.0**5, "bf16": 2.0**120, "fp8_e4m3": 2.0**5, "fp8_e5m2": 2.0**13}


@pytest.mark.parametrize("fmt", sorted(HAND_RANGES))
def test_format_range_matches_the_bit_layout(fmt):
  r = format_ranges.format_range(fmt)
  sub, normal, top = HAND_RANGES[fmt]
  assert (r.smallest_subnormal, r.smallest_normal, r.max) == (sub, normal, top)
  assert r.flush_at == sub / 2 and r.normal_at == normal - sub / 2
  assert r.overflow_at == top + HAND_ULP_MAX[fmt] / 2
  assert r.overflow_tie_up == (fmt != "fp8_e4m3")  # only e4m3fn's max has an even mantissa


@pytest.mark.parametrize("fmt", sorted(HAND_RANGES))
def test_under_and_overflow_counts_on_values_around_each_threshold(fmt):
  sub, normal, top = HAND_RANGES[fmt]
  tie = top + HAND_ULP_MAX[fmt] / 2
  up, down = (lambda v: np.nextafter(v, np.inf)), (lambda v: np.nextafter(v, 0))
  values = np.array(
    [
      0.0,  # zeros: 1
      sub / 2,
      -sub / 4,
      down(sub / 2),  # flush: 3 (sub/2 ties to the even neighbour 0)
      up(sub / 2),
      -sub,
      down(normal - sub / 2),  # subnormal: 3
      normal - sub / 2,
      normal,
      -top,  # normal: rounds to a normal number
      down(tie),  # rounds down to max: not an overflow
      tie,  # overflow for fp16/bf16/e5m2 (max's mantissa is odd), max for e4m3
      -up(tie),
      1e300,  # overflow: 2
      np.inf,
      np.nan,  # nonfinite: 2
    ]
  )
  counts = format_ranges.classify(values, fmt)
  overflow = 2 + (fmt != "fp8_e4m3")
  assert counts == {
    "size": 16,
    "zeros": 1,
    "flush": 3,
    "subnormal": 3,
    "overflow": overflow,
    "nonfinite": 2,
  }
  fractions = format_ranges.format_fractions(values, [fmt])[fmt]
  assert fractions == {"flush": 3 / 16, "subnormal": 3 / 16, "overflow": overflow / 16}


@pytest.mark.parametrize("fmt", sorted(HAND_RANGES))
def test_classification_agrees_with_the_actual_cast(fmt):
  # float32 values spread over exponents -148..+20 (every format's edges), cast by ml_dtypes.
  rng = np.random.default_rng(0)
  x = (
    rng.uniform(1, 2, 20000) * 2.0 ** rng.integers(-148, 20, 20000) * rng.choice([-1, 1], 20000)
  ).astype(np.float32)
  y = np.abs(x.astype(format_ranges.FORMATS[fmt]).astype(np.float64))
  counts = format_ranges.classify(x, fmt)
  assert counts["flush"] == np.sum(y == 0) > 0
  assert counts["subnormal"] == np.sum((y > 0) & (y < HAND_RANGES[fmt][1])) > 0
  assert counts["overflow"] == np.sum(~np.isfinite(y))  # inf, or NaN for e4m3fn
  assert counts["overflow"] > 0 or fmt == "bf16"  # bf16 has fp32's range


def test_exponent_histogram_of_powers_of_two():
  x = np.array(
    [2.0**-3, -(2.0**-3), 1.0, 1.5, 1.999, 2.0**5, 0.0, -0.0, np.inf, 2.0**-140], np.float32
  )
  h = format_ranges.exponent_histogram(x)
  counts = [1] + [0] * 136 + [2, 0, 0, 3] + [0] * 4 + [1]  # exponents -140, -3, 0, 5
  assert h == {"min_exponent": -140, "counts": counts, "zeros": 2, "nonfinite": 1, "size": 10}
  merged = format_ranges.merge_histograms(
    [format_ranges.exponent_histogram(x[:4]), format_ranges.exponent_histogram(x[4:])]
  )
  assert merged == h
  assert format_ranges.exponent_histogram(np.zeros(3))["min_exponent"] is None


GPT2 = ModelConfig.gpt2(vocab_size=61, d_model=32, n_layers=1, n_heads=4, max_len=32)


def _setup(cfg=GPT2, b=2, t=12):
  task = make_task(Config(model=cfg, data=DataConfig(seq_len=t)))
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (b, t + 1)).astype(np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  model = build_model(cfg, make_precision("fp32"))
  params = nn.unbox(compiled.init(model, jax.random.key(0), batch["inputs"])["params"])
  return task, batch, jax.device_get(params)


@pytest.mark.slow
def test_probe_gradients_of_the_scaled_loss_in_closed_form():
  task, batch, params = _setup()
  model = numerics.diagnostic_model(GPT2, make_precision("fp32"))
  cap = numerics.capture(model, params, batch, task, loss_scale=1024.0)
  logits = cap.activations[numerics.LOGITS].astype(np.float64)  # [B, T, V]
  # d(S * mean CE)/d logits = S * (softmax - onehot(target)) / (number of tokens).
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  onehot = np.eye(GPT2.vocab_size)[batch["targets"]]
  expected = 1024.0 * (p - onehot) / batch["targets"].size
  # fp32 softmax of logits ~5: rounding ~1e-7 relative, times the scale.
  np.testing.assert_allclose(cap.activation_gradients[numerics.LOGITS], expected, atol=1e-5)
  unscaled = numerics.capture(model, params, batch, task, loss_scale=1.0)
  # Scaling by a power of two is exact in fp32: every gradient is exactly 1024x.
  chex.assert_trees_all_equal(cap.gradients, jax.tree.map(lambda g: g * 1024, unscaled.gradients))
  assert set(cap.weights) == set(cap.gradients) and "decoder/blocks_0/attn/query" in cap.activations
  assert "decoder/blocks_0/mlp" in cap.activation_gradients


@pytest.mark.slow
def test_fp32_error_against_float64_is_rounding_level_and_bf16_is_larger():
  task, batch, params = _setup()
  errors = numerics.policy_errors(GPT2, params, batch, task, ("fp32", "bf16"))
  fp32, bf16 = errors["fp32"], errors["bf16"]
  # fp32 rounding is 2^-24 ~ 6e-8 per op; a 1-layer model accumulates ~1e-7..1e-6.
  assert fp32["logits"] < 1e-5 and fp32["gradients_total"] < 1e-5 and fp32["loss"] < 1e-6
  assert max(v for v in fp32["activations"].values() if v is not None) < 1e-5
  assert max(v for v in fp32["gradients"].values() if v is not None) < 1e-5
  # bf16 keeps 8 significant bits (2^-9 relative): its errors are orders of magnitude larger.
  assert bf16["logits"] > 1e-4 and bf16["gradients_total"] > 1e-4
  assert bf16["logits"] > 100 * fp32["logits"]
  assert set(bf16["activations"]) == set(fp32["activations"])


@pytest.mark.slow
def test_scanned_params_unscan_to_the_unrolled_layout():
  cfg = dataclasses.replace(GPT2, n_layers=2, scan_layers=True)
  tokens = jnp.zeros((1, 8), jnp.int32)
  scanned = nn.unbox(
    compiled.init(build_model(cfg, make_precision("fp32")), jax.random.key(0), tokens)["params"]
  )
  unrolled = nn.unbox(
    compiled.init(
      numerics.diagnostic_model(cfg, make_precision("fp32")), jax.random.key(0), tokens
    )["params"]
  )
  flat = numerics.unscan_params(scanned, 2)
  chex.assert_trees_all_equal_shapes_and_dtypes(flat, unrolled)
  np.testing.assert_array_equal(
    flat["decoder"]["blocks_1"]["attn"]["query"]["kernel"],
    scanned["decoder"]["blocks"]["block"]["attn"]["query"]["kernel"][1],
  )


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  corpus = tmp_path_factory.mktemp("corpus")
  (corpus / "a.txt").write_text(
    "".join(
      f"Document {i}: the quick brown fox jumps over the lazy dog. " * 6 + "\n\n\n"
      for i in range(20)
    ),
    encoding="utf-8",
  )
  config = Config(
    model=dataclasses.replace(GPT2, vocab_size=259),
    optim=OptimConfig(lr=3e-3),
    data=DataConfig(paths=(str(corpus),), seq_len=32, val_fraction=0.2),
    train=TrainConfig(steps=2, batch_size=8, log_every=1, eval_every=2, ckpt_every=2),
    precision=PrecisionConfig(policy="fp16"),
  )
  workdir = str(tmp_path_factory.mktemp("run"))
  train(config, workdir, verbose=False)
  return workdir


@pytest.mark.slow
def test_diagnose_cli_writes_json_and_png(tiny_run, tmp_path, capsys):
  out = str(tmp_path / "diag")
  code = cli.main(
    [
      "diagnose",
      "--workdir",
      tiny_run,
      "--out",
      out,
      "--loss-scale",
      "1024",
      "--policies",
      "fp32",
      "--batch-size",
      "2",
    ]
  )
  assert code == 0
  printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  with open(os.path.join(out, "diagnose.json"), encoding="utf-8") as f:
    report = json.load(f)
  assert printed["json"] == os.path.join(out, "diagnose.json")
  assert report["loss_scale"] == 1024.0 and report["step"] == 2
  assert report["run_precision"] == "fp16" and report["precision"] == "fp32"
  assert set(report["totals"]) >= set(numerics.KINDS) and set(report["policy_errors"]) == {"fp32"}
  grads = report["totals"]["activation_gradients"]["hist"]
  unscaled = report["totals"]["activation_gradients_unscaled"]["hist"]
  assert unscaled["min_exponent"] == grads["min_exponent"] - 10  # x1024 = 10 binades
  assert unscaled["counts"] == grads["counts"]
  # Fewer values flush after scaling than before, in cases measured to flush: 0.15% of the
  # activation gradients in fp16 unscaled (none x1024); 18% of this kernel's gradient in
  # e5m2 (fp16's exponent range, two fewer mantissa bits) unscaled (none x1024).
  flush = lambda k: report["totals"][k]["formats"]["fp16"]["flush"]
  assert flush("activation_gradients") < flush("activation_gradients_unscaled")
  layer = report["layers"]["gradients"]["decoder/blocks_0/attn/query/kernel"]
  assert layer["formats_unscaled"]["fp8_e5m2"]["flush"] > layer["formats"]["fp8_e5m2"]["flush"]
  try:
    import matplotlib  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    pytest.skip("matplotlib missing: the PNG part needs the plots extra")
  with open(printed["png"], "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_diagnose_cli_bad_loss_scale_is_one_line(tiny_run, tmp_path, capsys):
  code = cli.main(
    [
      "diagnose",
      "--workdir",
      tiny_run,
      "--out",
      str(tmp_path),
      "--loss-scale",
      "-1",
      "--policies",
      "",
    ]
  )
  err = capsys.readouterr().err
  assert code == 2 and "--loss-scale" in err and len(err.strip().splitlines()) == 1


def _files(directory):
  """{path: (size, mtime)} of every file below ``directory``."""
  out = {}
  for root, _, names in os.walk(directory):
    for name in names:
      st = os.stat(os.path.join(root, name))
      out[os.path.join(root, name)] = (st.st_size, st.st_mtime_ns)
  return out


@pytest.mark.slow
def test_diagnose_reads_a_seq2seq_run_s_pairs_and_writes_nothing_into_it(tiny_run, tmp_path):
  """A seq2seq run is diagnosed on its own validation pairs (its task's data), and
  diagnose, like eval and generate, writes nothing into any run directory."""
  from llm_mp.config import apply_overrides  # pylint: disable=import-outside-toplevel
  from llm_mp.presets import get_preset  # pylint: disable=import-outside-toplevel

  pairs = tmp_path / "pairs.jsonl"
  pairs.write_text(
    "".join(json.dumps({"input": f"ab {i} cd", "target": f"{i} xy"}) + "\n" for i in range(40))
  )
  config = apply_overrides(
    get_preset("seq2seq_tiny"),
    [
      f"data.paths={pairs}",
      "model.n_layers=1",  # 1+1 blocks: the size does not matter here, the compiles do
      "model.n_decoder_layers=1",
      "model.d_model=32",
      "model.n_heads=2",
      "data.seq_len=16",
      "data.val_fraction=0.25",
      "train.steps=2",
      "train.batch_size=8",
      "train.log_every=1",
      "train.eval_every=2",
      "train.ckpt_every=2",
      "train.sample_tokens=0",
    ],
  )
  s2s = str(tmp_path / "s2s")
  train(config, s2s, verbose=False)
  for run in (s2s, tiny_run):
    before = _files(run)
    out = str(tmp_path / f"diag-{os.path.basename(run)}")
    args = ["diagnose", "--workdir", run, "--out", out, "--policies", "", "--batch-size", "2"]
    assert cli.main(args) == 0
    assert _files(run) == before  # no tokenizer.json or token cache rewritten
    with open(os.path.join(out, "diagnose.json"), encoding="utf-8") as f:
      assert json.load(f)["step"] == 2
