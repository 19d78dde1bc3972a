"""Typed values of config fields: a JSON value checked against a field's declared type,
an override's text parsed as it, and the type's readable name.

:mod:`llm_mp.config` uses these when it loads a stored config and applies
``section.field=value`` overrides; they know nothing of the sections themselves.
"""

from __future__ import annotations

import ast
import types
import typing
from typing import Any, Sequence


def type_name(tp: Any) -> str:
  """``int`` -> 'int'; ``int | None`` -> 'int | None' (for error messages and the reference)."""
  if typing.get_origin(tp) is not None or isinstance(tp, types.UnionType):
    return str(tp).replace("typing.", "")
  return getattr(tp, "__name__", str(tp))


def _optional(tp: Any) -> tuple[Any, bool]:
  """``int | None`` -> (int, True); ``int`` -> (int, False)."""
  if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if len(args) == 1:
      return args[0], len(args) < len(typing.get_args(tp))
  return tp, False


def check_value(key: str, tp: Any, value: Any) -> Any:
  """``value`` (from JSON or a preset) as field ``key``'s declared type ``tp``.

  Ints are accepted for float fields (and become floats); lists for tuple
  fields. Raises ValueError naming the field, its type and the value.
  """
  base, optional = _optional(tp)
  if value is None and optional:
    return None
  bad = ValueError(f"{key}={value!r} is not of type {type_name(tp)}")
  if base is bool:
    if not isinstance(value, bool):
      raise bad
  elif base is int:
    if isinstance(value, bool) or not isinstance(value, int):
      raise bad
  elif base is float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise bad
    value = float(value)
  elif base is str:
    if not isinstance(value, str):
      raise bad
  elif typing.get_origin(base) is tuple:
    if not isinstance(value, (list, tuple)):
      raise bad
    item = typing.get_args(base)[0]
    if item is str and not all(isinstance(v, str) for v in value):
      raise bad
    value = tuple(value)
  return value


_TRUE, _FALSE = ("true", "1", "yes"), ("false", "0", "no")


def parse_value(key: str, tp: Any, text: str) -> Any:
  """Override text as field ``key``'s declared type ``tp``.

  ``int``: '3', or an integral float such as '1e4'; ``float``: '1e-3';
  ``bool``: true/false/1/0/yes/no; ``X | None``: also 'none'/'null'; ``str``:
  the text as is ('none' is a loss-scale kind, not None); ``tuple[str, ...]``:
  comma-separated ('' = empty) or a Python literal; ``mesh.rules``: a Python literal.

  Raises ValueError naming the field, its type and the text.
  """
  base, optional = _optional(tp)
  if optional and text.strip().lower() in ("none", "null"):
    return None
  bad = ValueError(f"{key}={text!r} is not of type {type_name(tp)}")
  if base is bool:
    low = text.strip().lower()
    if low not in _TRUE + _FALSE:
      raise bad
    return low in _TRUE
  if base is int:
    try:
      return int(text)
    except ValueError:
      pass
    try:
      x = float(text)
    except ValueError:
      raise bad from None
    if not x.is_integer():
      raise bad
    return int(x)
  if base is float:
    try:
      return float(text)
    except ValueError:
      raise bad from None
  if base is str:
    return text
  if (
    typing.get_origin(base) is tuple
    and typing.get_args(base)[0] is str
    and not text.lstrip().startswith(("(", "["))
  ):  # a literal: ('a.txt', 'b,c.txt')
    return tuple(p.strip() for p in text.split(",") if p.strip())
  try:  # mesh.rules: (('mlp', 'tensor'),)
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    raise bad from None
  return check_value(key, tp, value)


def check_choice(section: str, field: str, value: Any, choices: Sequence[Any]) -> None:
  """ValueError naming ``section.field`` unless ``value`` is one of ``choices``."""
  if value not in choices:
    raise ValueError(f"{section}.{field}={value!r} is not one of {list(choices)}")


def check_positive(section: str, field: str, value: Any, allow_zero: bool = False) -> None:
  """ValueError naming ``section.field`` unless ``value`` > 0 (or >= 0 with ``allow_zero``)."""
  ok = value >= 0 if allow_zero else value > 0
  if not ok:
    bound = ">= 0" if allow_zero else "> 0"
    raise ValueError(f"{section}.{field}={value!r} must be {bound}")
