"""Configs: every preset loads and round-trips; overrides are checked."""

import dataclasses
import json

import jax
import pytest

from llm_mp.builder import build_recipe
from llm_mp.config import PRESETS, Config, apply_overrides, get_preset
from llm_mp.data import ByteTokenizer
from llm_mp.models import FAMILIES, EncoderDecoder, TransformerEncoder, TransformerLM

FAMILY_CLASSES = {"decoder": TransformerLM, "encoder": TransformerEncoder,
                  "encoder_decoder": EncoderDecoder}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_and_round_trips_through_json(name):
  config = get_preset(name)
  assert Config.from_dict(json.loads(config.to_json())) == config
  # The builder makes each preset's model (its family, its task's head) by shape.
  model = build_recipe(config, ByteTokenizer()).model
  assert isinstance(model, FAMILY_CLASSES[config.model.family])
  example = FAMILIES[config.model.family].example_inputs(config.data.seq_len)
  shapes = jax.eval_shape(model.init, jax.random.key(0), *example)
  assert shapes["params"]["embed"]["embedding"].value.shape == (config.model.vocab_size,
                                                               config.model.d_model)


def test_overrides_parse_values_and_validate():
  c = apply_overrides(get_preset("tiny"), ["model.n_layers=6", "optim.lr=3e-4",
                                           "optim.clip_norm=none", "model.scan_layers=true",
                                           "data.paths=a.txt", "train.loss_scale=none"])
  assert (c.model.n_layers, c.optim.lr, c.optim.clip_norm, c.model.scan_layers) == (
      6, 3e-4, None, True)
  assert c.data.paths == ("a.txt",) and c.train.loss_scale == "none"
  assert dataclasses.replace(c, model=get_preset("tiny").model).model.n_layers == 4


@pytest.mark.parametrize("override,message", [
    ("model.n_layer=6", "model.n_layer"),
    ("modle.n_layers=6", "modle"),
    ("n_layers=6", "section.field"),
    ("model.n_heads=3", "n_heads=3"),
    ("data.seq_len=4096", "max_len"),
    ("optim.name=lamb", "lamb"),
    ("train.loss_scale=huge", "huge"),
])
def test_bad_overrides_name_the_field_and_value(override, message):
  with pytest.raises(ValueError, match=message):
    apply_overrides(get_preset("tiny"), [override])


def test_unknown_preset_lists_known_names():
  with pytest.raises(ValueError, match="tiny"):
    get_preset("gpt5")
