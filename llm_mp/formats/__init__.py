"""Matmul formats: how a layer stores its weight and computes ``x @ W``.

Layout (each module imports only those below it):

* ``base``: :class:`Weight`, :class:`Format` (a registry entry), the
  contraction (:func:`contract`, the custom-VJP :func:`dense`),
  :func:`weight_param`, the plain format ``none``, :func:`stored_bytes`.
* ``fp8``, ``int8``, ``lowrank``: one module per family of formats, each
  exporting its :class:`Format` entries.
* ``registry``: :data:`FORMATS`, :func:`register_format`, :func:`parse_format`,
  :func:`parse_formats`, the queries :func:`state_collections` and
  :func:`weight_only_formats`, and the one :func:`matmul` of every weight.
"""

from llm_mp.formats.base import (
  Format,
  Weight,
  contract,
  dense,
  stored_bytes,
  weight_param,
)
from llm_mp.formats.registry import (
  FORMATS,
  matmul,
  module_format,
  parse_format,
  parse_formats,
  register_format,
  require_float_weights,
  state_collections,
  traced_matmuls,
  weight_only_formats,
)

__all__ = [
  "FORMATS",
  "Format",
  "Weight",
  "contract",
  "dense",
  "matmul",
  "module_format",
  "parse_format",
  "parse_formats",
  "register_format",
  "require_float_weights",
  "state_collections",
  "stored_bytes",
  "traced_matmuls",
  "weight_only_formats",
  "weight_param",
]
