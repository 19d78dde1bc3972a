"""The ``lowrank:R`` matmul format and the truncated-SVD conversion of trained runs:
factors against numpy's SVD and the Eckart-Young error, the format's forward pass
against ``x @ (U @ V)``, its init scale, training from scratch, and ``llm-mp lowrank``
end to end (full rank reproduces the run's perplexity, a small rank raises it)."""

import json

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llm_mp import cli
from llm_mp.builder import build_recipe, run_precision
from llm_mp.config import apply_overrides
from llm_mp.formats import parse_formats
from llm_mp.formats.lowrank import factorize, svd_factors
from llm_mp.lowrank_convert import svd_sweep
from llm_mp.models.layers import Dense
from llm_mp.precision import make_precision
from llm_mp.presets import get_preset
from llm_mp.state import make_init_fn
from llm_mp.step import make_train_step
from llm_mp.train import train

TEXT = "\n\n\n".join(
  f"Note {i}: {' '.join(w[::-1] if (i + j) % 3 == 0 else w for j, w in enumerate(words))}."
  for i, words in enumerate(
    ["the quick brown fox jumps over the lazy dog while a cat sleeps".split()] * 40
  )
)


def _dense(fmt, features=(4, 8), n_in=1, std=0.02):
  return Dense(
    features,
    ("embed", "heads", "kv")[: n_in + len(features)],
    make_precision(formats=parse_formats(fmt)),
    use_bias=False,
    n_in=n_in,
    init_std=std,
  )


def test_full_rank_factors_reproduce_the_kernel_and_truncation_meets_eckart_young():
  rng = np.random.default_rng(0)
  w = rng.standard_normal((3, 12, 2, 5))  # 3 experts, in 12, out (2, 5): [K, N] = [12, 10]
  s_ref = np.linalg.svd(w.reshape(3, 12, 10), compute_uv=False)  # (3, 10)
  for rank in (10, 16):  # 16 > min(K, N): zero-padded, still exact
    u, v = svd_factors(w, n_batch=1, n_in=1, rank=rank)
    chex.assert_shape((u, v), [(3, 12, rank), (3, rank, 2, 5)])
    np.testing.assert_allclose(np.einsum("ekr,ernm->eknm", u, v), w, atol=1e-12)
  for rank in (1, 4, 9):
    u, v = svd_factors(w, n_batch=1, n_in=1, rank=rank)
    err = np.linalg.norm((w - np.einsum("ekr,ernm->eknm", u, v)).reshape(3, -1), axis=-1)
    np.testing.assert_allclose(err, np.linalg.norm(s_ref[:, rank:], axis=-1), rtol=1e-10)
    # sqrt(S) in both factors: equal column / row norms.
    np.testing.assert_allclose(np.linalg.norm(u, axis=1), np.linalg.norm(v, axis=(2, 3)))


def test_factorize_finds_the_batch_axes_and_copies_the_rest():
  rng = np.random.default_rng(1)
  w, scale = rng.standard_normal((4, 6, 10)), rng.standard_normal(6)  # 4 experts [6, 10]
  sds = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  abstract = {"moe": {"w_in_u": sds(4, 6, 3), "w_in_v": sds(4, 3, 10)}, "norm": sds(6)}
  params, done = factorize({"moe": {"w_in": w}, "norm": scale}, abstract)
  assert done == ["moe/w_in"]
  u, v = svd_factors(w, n_batch=1, n_in=1, rank=3)
  chex.assert_trees_all_close(
    params, {"moe": {"w_in_u": u, "w_in_v": v}, "norm": scale}, rtol=1e-6, atol=1e-7
  )
  chex.assert_type(params["moe"]["w_in_u"], jnp.float32)
  with pytest.raises(ValueError, match=r"params: norm has shape \[5\], the low-rank model"):
    factorize({"moe": {"w_in": w}, "norm": scale[:5]}, abstract)
  with pytest.raises(ValueError, match="params: moe/w_in_u is missing from the dense model"):
    factorize({"moe": {}, "norm": scale}, abstract)


def test_the_format_computes_x_u_v_with_factor_shapes_and_axes():
  layer = _dense("lowrank:3", features=(4, 8))
  x = jax.random.normal(jax.random.key(1), (2, 5, 16))
  variables = nn.unbox(layer.init(jax.random.key(0), x))
  boxed = layer.init(jax.random.key(0), x)["params"]
  assert boxed["kernel_u"].names == ("embed", None)
  assert boxed["kernel_v"].names == (None, "heads", "kv")
  u, v = variables["params"]["kernel_u"], variables["params"]["kernel_v"]
  chex.assert_shape((u, v), [(16, 3), (3, 4, 8)])
  want = np.einsum("btk,kn->btn", np.float64(x), np.float64(u) @ np.float64(v).reshape(3, 32))
  got = layer.apply(variables, x)
  chex.assert_shape(got, (2, 5, 4, 8))
  chex.assert_type(got, jnp.float32)
  np.testing.assert_allclose(got.reshape(2, 5, 32), want, rtol=1e-5, atol=1e-6)


def test_full_rank_factors_of_a_dense_layer_give_its_outputs():
  dense = _dense("none", features=(32,), n_in=2)
  x = jax.random.normal(jax.random.key(2), (4, 7, 2, 8))  # two contracted axes: K = 16
  params = nn.unbox(dense.init(jax.random.key(0), x))["params"]
  low = _dense("lowrank:16", features=(32,), n_in=2)
  abstract = jax.eval_shape(lambda: nn.unbox(low.init(jax.random.key(0), x))["params"])
  factors, done = factorize(params, abstract)
  assert done == ["kernel"]
  chex.assert_trees_all_close(
    low.apply({"params": factors}, x), dense.apply({"params": params}, x), atol=1e-6
  )


def test_init_scale_of_the_product_matches_the_dense_init():
  layer = _dense("lowrank:16", features=(512,), std=0.02)
  x = jnp.zeros((1, 512))
  p = nn.unbox(layer.init(jax.random.key(3), x))["params"]
  product = np.float64(p["kernel_u"]) @ np.float64(p["kernel_v"])  # (512, 512)
  # ||UV||_F^2 concentrates within a few percent of K*N*std^2 at K = N = 512.
  np.testing.assert_allclose(product.std(), 0.02, rtol=0.1)
  np.testing.assert_allclose(np.std(p["kernel_u"]), 1 / np.sqrt(512), rtol=0.05)


@pytest.mark.parametrize("fmt", ["lowrank:0", "lowrank:x", "lowrank", "lowrank:2.5"])
def test_a_bad_rank_names_the_field_and_value(fmt):
  with pytest.raises(ValueError, match=f"precision.formats: {fmt}"):
    run_precision(apply_overrides(get_preset("tiny"), [f"precision.formats={fmt}"]))


def _config(corpus, steps, *overrides):
  return apply_overrides(
    get_preset("tiny"),
    [
      "model.d_model=32",
      "model.n_layers=3",
      "model.n_heads=2",
      "model.n_kv_heads=1",
      "model.max_len=32",
      "model.vocab_multiple=1",
      f"data.paths={corpus}",
      "data.seq_len=32",
      "data.val_fraction=0.2",
      f"train.steps={steps}",
      "train.batch_size=8",
      "train.log_every=1",
      f"train.eval_every={steps}",
      "train.eval_batches=2",
      f"train.ckpt_every={steps}",
      "train.sample_tokens=0",
      "optim.warmup_steps=2",
      "optim.lr=1e-2",
      *overrides,
    ],
  )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  path = tmp_path_factory.mktemp("corpus") / "text.txt"
  path.write_text(TEXT, encoding="utf-8")
  return str(path)


def _text_batch(step, b=8, t=32):
  """Rows of ``TEXT``'s bytes: ``inputs``/``targets`` int32 ``[b, t]``, a new slice per step."""
  data = np.frombuffer(TEXT.encode(), np.uint8).astype(np.int32)
  starts = (np.arange(b) * 97 + step * b * 31) % (len(data) - t - 1)
  rows = np.stack([data[s : s + t + 1] for s in starts])  # (b, t + 1)
  return {
    "inputs": jnp.asarray(rows[:, :-1]),
    "targets": jnp.asarray(rows[:, 1:]),
    "segment_ids": jnp.ones((b, t), jnp.int32),
    "positions": jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)),
  }


@pytest.mark.slow
def test_a_lowrank_model_trains_from_scratch():
  steps = 40  # with 20 steps of its cosine schedule it ends at the unigram level (3.12 nats)
  config = _config(
    "unused.txt",
    steps,
    "model.n_layers=1",  # with the edges included every matmul is low-rank
    "precision.formats=lowrank:8",
    "precision.format_edges=true",
  )
  r = build_recipe(config)
  state = jax.jit(make_init_fn(r.model, r.tx, config))(jax.random.key(0))
  assert set(state.params["lm_head"]) == {"kernel_u", "kernel_v"}  # edges included
  assert set(state.params["decoder"]["blocks_0"]["mlp"]["up"]) == {"kernel_u", "kernel_v"}
  step = jax.jit(make_train_step(r.model, r.tx, r.schedule, config, r.task), donate_argnums=0)
  losses, unigram = [], []
  for i in range(steps):
    batch = _text_batch(i)
    counts = np.bincount(np.asarray(batch["targets"]).ravel())
    p = counts[counts > 0] / counts.sum()
    unigram.append(-np.sum(p * np.log(p)))  # the best a byte-frequency model does on it
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  # From ln(259) = 5.6 (uniform bytes); the batches' own unigram entropy is 3.06-3.17 nats.
  # Measured over the last 3 steps: loss 2.13 against 3.13, so the model uses context; one
  # that learned byte frequencies only could not go below 3.1.
  assert np.mean(losses[-3:]) < np.mean(unigram[-3:]) - 0.5, (losses, unigram)


@pytest.mark.slow
def test_lowrank_command_converts_a_trained_run(corpus, tmp_path, capsys):
  workdir = str(tmp_path / "dense")
  train(_config(corpus, 20), workdir, verbose=False)
  # Rank 32 is full here (d_model 32): the command refuses it, the in-memory sweep pads.
  assert cli.main(["lowrank", "--workdir", workdir, "--rank", "32"]) == 2
  assert "use a rank below 16" in capsys.readouterr().err  # the [32, 16] key/value kernels
  assert cli.main(["lowrank", "--workdir", workdir, "--rank", "8"]) == 0
  counts = json.loads(capsys.readouterr().out)
  out = workdir + "-lowrank8"
  # The middle block's 7 matmuls (q, k, v, out, gate, up, down); edges and head stay dense.
  assert counts["out"] == out and counts["factorised"] == 7
  assert counts["params_after"] < counts["params_before"]
  assert cli.main(["eval", "--workdir", out]) == 0
  written = json.loads(capsys.readouterr().out)
  dense, full_in_memory, low8, low = svd_sweep(workdir, [32, 8, 2])
  assert (dense["rank"], full_in_memory["rank"], low["rank"]) == (None, 32, 2)
  # Full rank: U @ V = W up to fp32 rounding of the factors.
  np.testing.assert_allclose(full_in_memory["perplexity"], dense["perplexity"], rtol=1e-4)
  np.testing.assert_allclose(low8["perplexity"], written["val_ppl"], rtol=1e-6)
  assert low["params"] < dense["params"]
  assert low["perplexity"] > dense["perplexity"] * 1.01, (dense, low)
