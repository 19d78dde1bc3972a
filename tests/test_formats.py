"""The precision section and the matmul-format seam: a format reaches exactly the
modules its pattern names, and the first/last blocks and heads are kept by default."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from llm_mp.builder import build_recipe, edge_patterns, run_precision
from llm_mp.config import apply_overrides
from llm_mp.precision import make_precision, precision_report
from llm_mp.presets import get_preset


def _config(*overrides):
  return apply_overrides(get_preset("tiny"), ["model.vocab_multiple=1", *overrides])


def test_overrides_from_the_config_reach_the_modules_they_name():
  config = _config("precision.policy=bf16", "precision.overrides=*mlp*=f32;lm_head=c=f32")
  r = build_recipe(config)
  tokens = jnp.zeros((1, 8), jnp.int32)
  params = jax.eval_shape(lambda: r.model.init(jax.random.key(0), tokens))["params"]
  modules = precision_report(r.model, params, tokens)["modules"]
  assert modules["decoder/blocks_1/mlp/up"].startswith("compute=float32")
  assert modules["decoder/blocks_1/attn/query"] == "compute=bfloat16, output=bfloat16, format=none"
  # An override sets only the fields it names, on top of the defaults: fp32 logits stay.
  assert modules["lm_head"] == "compute=float32, output=float32, format=none"


def _routing(config, formats, edges=False):
  # Routing alone: the format names need not be registered for format_for.
  p = make_precision(protected=() if edges else edge_patterns(config))
  pairs = tuple((pat or "*", fmt) for pat, _, fmt in (f.rpartition("=") for f in formats))
  return dataclasses.replace(p, formats=pairs)


def test_a_bare_format_skips_the_first_and_last_block_and_the_heads():
  p = _routing(_config(), ["int8"])
  assert p.format_for("decoder/blocks_1/mlp/up") == "int8"
  assert p.format_for("decoder/blocks_2/attn/query") == "int8"
  for path in ("decoder/blocks_0/mlp/up", "decoder/blocks_3/attn/out", "lm_head"):
    assert p.format_for(path) == "none", path
  p = _routing(_config(), ["int8"], edges=True)
  assert p.format_for("decoder/blocks_0/mlp/up") == p.format_for("lm_head") == "int8"


def test_no_format_reaches_the_moe_router():
  p = run_precision(_config("precision.formats=*mlp*=int8", "precision.format_edges=true"))
  assert p.format_for("decoder/blocks_1/mlp/router") == "none"
  assert p.format_for("decoder/blocks_1/mlp") == "int8"  # the experts


def test_the_last_matching_pattern_wins():
  p = _routing(_config(), ["*mlp*=int8", "*mlp/down=none"])
  assert p.format_for("decoder/blocks_1/mlp/up") == "int8"
  assert p.format_for("decoder/blocks_1/mlp/down") == "none"
  assert p.format_for("decoder/blocks_1/attn/query") == "none"


def test_encoder_decoder_edges_are_per_stack():
  config = apply_overrides(
    get_preset("seq2seq_tiny"), ["model.n_layers=3", "model.n_decoder_layers=4"]
  )
  p = _routing(config, ["int8"])
  assert p.format_for("encoder/stack/blocks_2/mlp/up") == "none"
  assert p.format_for("decoder/stack/blocks_2/mlp/up") == "int8"
  assert p.format_for("decoder/stack/blocks_3/mlp/up") == "none"


@pytest.mark.parametrize(
  "override, match",
  [
    ("precision.formats=int3", "unknown matmul format 'int3' in precision.formats"),
    ("precision.policy=fp12", "unknown precision 'fp12'"),
    ("precision.overrides=*mlp*=f12", "unknown override dtype 'f12'"),
  ],
)
def test_bad_precision_specs_name_the_field(override, match):
  with pytest.raises(ValueError, match=match):
    run_precision(_config(override))


def test_bad_precision_values_are_rejected_with_the_field_name():
  with pytest.raises(ValueError, match="precision.fp8_scaling='late'"):
    _config("precision.fp8_scaling=late")
