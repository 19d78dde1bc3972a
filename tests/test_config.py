"""Configs: every preset loads and round-trips; overrides are checked."""

import dataclasses
import json
import re

import jax
import pytest

from llm_mp.builder import build_recipe
from llm_mp.config import Config, MeshConfig, apply_overrides
from llm_mp.config_docs import describe
from llm_mp.data import ByteTokenizer
from llm_mp.models import FAMILIES, EncoderDecoder, TransformerEncoder, TransformerLM
from llm_mp.presets import PRESETS, get_preset

FAMILY_CLASSES = {
  "decoder": TransformerLM,
  "encoder": TransformerEncoder,
  "encoder_decoder": EncoderDecoder,
}


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.slow
def test_every_preset_builds_and_round_trips_through_json(name):
  config = get_preset(name)
  assert Config.from_dict(json.loads(config.to_json())) == config
  # The builder makes each preset's model (its family, its task's head) by shape.
  model = build_recipe(config, ByteTokenizer()).model
  assert isinstance(model, FAMILY_CLASSES[config.model.family])
  example = FAMILIES[config.model.family].example_inputs(config.data.seq_len)
  shapes = jax.eval_shape(model.init, jax.random.key(0), *example)
  assert shapes["params"]["embed"]["embedding"].value.shape == (
    config.model.padded_vocab,
    config.model.d_model,
  )


def test_overrides_parse_values_and_validate():
  c = apply_overrides(
    get_preset("tiny"),
    [
      "model.n_layers=6",
      "optim.lr=3e-4",
      "optim.clip_norm=none",
      "model.scan_layers=true",
      "data.paths=a.txt",
      "precision.loss_scale=none",
    ],
  )
  assert (c.model.n_layers, c.optim.lr, c.optim.clip_norm, c.model.scan_layers) == (
    6,
    3e-4,
    None,
    True,
  )
  assert c.data.paths == ("a.txt",) and c.precision.loss_scale == "none"


def test_overrides_are_parsed_to_the_fields_declared_type():
  c = apply_overrides(
    get_preset("tiny"),
    [
      "train.steps=1e1",
      "optim.lr=1",
      "model.use_bias=yes",
      "model.tie_embeddings=0",
      "model.d_ff=none",
      "data.paths=a.txt, b.txt",
      "train.init_from=null",
      "data.max_docs=7",
      "mesh.rules=(('mlp', 'tensor'),)",
      "train.sample_prompt=1e1",
    ],
  )
  assert type(c.train.steps) is int and c.train.steps == 10  # was 10.0, then a crash
  assert type(c.optim.lr) is float and c.optim.lr == 1.0
  assert c.model.use_bias is True and c.model.tie_embeddings is False
  assert c.model.d_ff is None and c.train.init_from is None and c.data.max_docs == 7
  assert c.data.paths == ("a.txt", "b.txt") and c.mesh.rules == (("mlp", "tensor"),)
  c = apply_overrides(c, ["data.paths=('a.txt', 'b,c.txt')"])  # experiments/precision_study
  assert c.data.paths == ("a.txt", "b,c.txt")
  assert c.train.sample_prompt == "1e1"  # a str field keeps the text
  assert json.loads(c.to_json())["train"]["steps"] == 10


@pytest.mark.parametrize(
  "override,message",
  [
    ("model.n_layers=abc", "model.n_layers='abc' is not of type int"),
    ("model.n_layers=2.5", "model.n_layers='2.5' is not of type int"),
    ("model.use_bias=maybe", "model.use_bias='maybe' is not of type bool"),
    ("optim.lr=fast", "optim.lr='fast' is not of type float"),
    ("optim.clip_norm=off", "optim.clip_norm='off' is not of type float | None"),
    ("mesh.rules=[1, 2", "mesh.rules="),
  ],
)
def test_override_of_the_wrong_type_names_field_type_and_text(override, message):
  with pytest.raises(ValueError) as e:
    apply_overrides(get_preset("tiny"), [override])
  assert message in str(e.value)


@pytest.mark.parametrize(
  "section,values,message",
  [
    ("train", {"steps": 10.0}, "train.steps=10.0 is not of type int"),
    ("model", {"use_bias": "yes"}, "model.use_bias='yes' is not of type bool"),
    ("data", {"paths": "a.txt"}, "data.paths='a.txt' is not of type tuple"),
    ("optim", {"clip_norm": "1"}, "optim.clip_norm='1' is not of type float | None"),
    ("train", [1], "config section 'train' must be an object"),
  ],
)
def test_from_dict_rejects_values_of_the_wrong_type(section, values, message):
  with pytest.raises(ValueError) as e:
    Config.from_dict({section: values})
  assert message in str(e.value)


def test_from_dict_accepts_ints_for_floats_and_lists_for_tuples():
  c = Config.from_dict({"optim": {"lr": 1, "clip_norm": None}, "data": {"paths": ["a"]}})
  assert type(c.optim.lr) is float and c.optim.clip_norm is None and c.data.paths == ("a",)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_fits_its_default_tokenizer(name):
  # The default data: the embedded corpus with data.tokenizer (byte: 259 ids;
  # bpe: data.bpe_vocab_size ids). nanogpt_cpu had vocab_size=65 < 259.
  c = get_preset(name)
  needed = 259 if c.data.tokenizer == "byte" else c.data.bpe_vocab_size
  assert c.model.vocab_size >= needed


def test_tiny_preset_widths_split_over_tensor_axes():
  m = get_preset("tiny").model
  assert (m.vocab_size, m.padded_vocab, m.ff_dim) == (259, 320, 384)  # were 259 and 341
  for tensor in (2, 4, 8):
    assert m.padded_vocab % tensor == 0 and m.ff_dim % tensor == 0 and m.kv_heads % 2 == 0
  assert Config().model.padded_vocab == 259  # vocab_multiple defaults to 1: no padding


@pytest.mark.parametrize(
  "override,message",
  [
    ("model.n_layer=6", "model.n_layer"),
    ("modle.n_layers=6", "modle"),
    ("n_layers=6", "section.field"),
    ("model.n_heads=3", "n_heads=3"),
    ("data.seq_len=4096", "max_len"),
    ("optim.name=lamb", "lamb"),
    ("precision.loss_scale=huge", "huge"),
  ],
)
def test_bad_overrides_name_the_field_and_value(override, message):
  with pytest.raises(ValueError, match=message):
    apply_overrides(get_preset("tiny"), [override])


@pytest.mark.parametrize(
  "override, suggestion",
  [
    ("model.n_layer=6", "did you mean 'model.n_layers'?"),
    ("train.step=6", "did you mean 'train.steps'?"),
    ("modle.n_layers=6", "did you mean 'model'?"),
  ],
)
def test_a_near_miss_key_gets_a_did_you_mean(override, suggestion):
  with pytest.raises(ValueError, match=re.escape(suggestion)):
    apply_overrides(get_preset("tiny"), [override])


def test_unknown_preset_lists_known_names():
  with pytest.raises(ValueError, match="tiny"):
    get_preset("gpt5")


def test_config_reference_lists_every_field_with_type_value_and_meaning():
  text = describe(get_preset("tiny"))
  for section in dataclasses.fields(Config):
    for f in dataclasses.fields(type(getattr(Config(), section.name))):
      row = next(
        line for line in text.splitlines() if line.startswith(f"| `{section.name}.{f.name}` |")
      )
      assert len(row.split(" | ")) == 4 and not row.endswith("|  |"), row  # a meaning
  assert "| `model.vocab_multiple` | `int` | `64` |" in text  # the preset's value
  assert "| `optim.clip_norm` | `float or None` | `1.0` |" in text


def test_docs_configuration_md_is_the_generated_reference():
  import os  # pylint: disable=import-outside-toplevel

  path = os.path.join(os.path.dirname(__file__), "..", "docs", "configuration.md")
  with open(path, encoding="utf-8") as f:
    assert describe() in f.read(), "regenerate with `llm-mp config`"


def test_cli_config_prints_the_reference(capsys):
  from llm_mp import cli  # pylint: disable=import-outside-toplevel

  assert cli.main(["config", "--preset", "nanogpt_cpu"]) == 0
  assert capsys.readouterr().out.strip() == describe(get_preset("nanogpt_cpu")).strip()


@pytest.mark.multidevice
def test_tiny_preset_shards_over_data_fsdp_and_tensor_axes_of_2():
  from llm_mp import sharding  # pylint: disable=import-outside-toplevel
  from llm_mp.state import abstract_train_state  # pylint: disable=import-outside-toplevel

  config = get_preset("tiny")
  config = dataclasses.replace(config, mesh=MeshConfig(data=2, fsdp=2, tensor=2))
  r = build_recipe(config)
  mesh = sharding.make_mesh(config.mesh)
  # Before: model.d_ff=341 and vocab_size=259 do not split over tensor=2.
  state = abstract_train_state(r.model, r.tx, config, mesh, jax.random.key(0))
  assert state.params["embed"]["embedding"].shape == (320, 128)
