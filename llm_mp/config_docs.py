"""The configuration reference: every config field, its type, value and meaning.

:func:`describe` renders it as Markdown (``llm-mp config`` prints it and
docs/configuration.md is its output); the meanings are the comments beside the
fields in llm_mp/config.py, read by :func:`field_docs`.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import typing
from typing import Any

from llm_mp.config import Config
from llm_mp.config_values import type_name

_FIELD_LINE = re.compile(r"^  (\w+): [^=]+?(?: = .*?)?(?:  # (.*))?$")


def field_docs(section_cls: type) -> dict[str, str]:
  """``{field: meaning}`` from the comments in ``section_cls``'s source: the
  field line's trailing comment, after any comment lines just above it."""
  docs, above = {}, []
  for line in inspect.getsource(section_cls).splitlines():
    stripped = line.strip()
    if line.startswith("  #"):
      above.append(stripped.lstrip("# "))
      continue
    m = _FIELD_LINE.match(line)
    if m and not stripped.startswith(("def ", "@", "return")):
      docs[m.group(1)] = " ".join(above + ([m.group(2)] if m.group(2) else []))
    above = []
  return docs


def describe(config: Config | None = None) -> str:
  """Every config field as a Markdown table per section: ``section.field``, its
  type, its value in ``config`` (default: ``Config()``) and its meaning.
  ``llm-mp config`` prints it; docs/configuration.md is its output."""
  config = Config() if config is None else config
  lines = []
  for f in dataclasses.fields(Config):
    section = getattr(config, f.name)
    cls = type(section)
    lines += [
      f"## {f.name}",
      "",
      (cls.__doc__ or "").strip().splitlines()[0],
      "",
      "| field | type | value | meaning |",
      "|---|---|---|---|",
    ]
    hints, docs = typing.get_type_hints(cls), field_docs(cls)
    for g in dataclasses.fields(cls):
      value = json.dumps(_flat_value(getattr(section, g.name)))
      kind = type_name(hints[g.name]).replace(" | ", " or ")  # "|" would end the cell
      lines.append(
        f"| `{f.name}.{g.name}` | `{kind}` | `{value}` | {docs.get(g.name, '').replace('|', '/')} |"
      )
    lines.append("")
  return "\n".join(lines)


def _flat_value(v: Any) -> Any:
  return [_flat_value(x) for x in v] if isinstance(v, tuple) else v
