"""A command line -> the run's :class:`~llm_mp.config.Config`: the preset (or the
workdir's stored config, or the ``--init-from`` run's), the shorthand flags
(``--precision``, ``--steps``, ``--task``, ``--teacher``...), data paths, the mesh and
dotted ``section.field=value`` overrides given anywhere on the line."""

from __future__ import annotations

import argparse
import dataclasses
import os
import re

from llm_mp.config import MESH_AXES, Config, MeshConfig, apply_overrides
from llm_mp.presets import get_preset

# A dotted override ``section.field=value``, told apart from a data path anywhere on the line.
OVERRIDE = re.compile(r"^(model|optim|data|train|mesh|precision)\.\w+=")


def parse_mesh(text: str) -> MeshConfig:
  """'data=2,fsdp=2,tensor=2' -> MeshConfig; ValueError on unknown axes."""
  sizes = {}
  for part in text.split(","):
    if "=" not in part:
      raise ValueError(f"--mesh entry {part!r} is not of the form axis=size")
    axis, size = part.split("=", 1)
    if axis not in MESH_AXES:
      raise ValueError(f"--mesh axis {axis!r} is not one of {', '.join(MESH_AXES)}")
    try:
      sizes[axis] = int(size)
    except ValueError:
      raise ValueError(f"--mesh {axis}={size!r}: the size is not an integer") from None
  if "data" not in sizes:
    sizes["data"] = 1 if -1 in sizes.values() else -1
  return MeshConfig(**sizes)


def resolve_config(args: argparse.Namespace) -> Config:
  """Preset (or the workdir's stored config) + --precision/--data/--mesh + overrides."""
  from llm_mp.rundir import stored_config  # pylint: disable=import-outside-toplevel

  config = (
    get_preset(args.preset)
    if args.preset
    else (stored_config(args.workdir) or _init_from_config(args) or get_preset("tiny"))
  )
  paths = [p for p in (args.data or []) if not OVERRIDE.match(p)]
  overrides = [p for p in (args.data or []) if OVERRIDE.match(p)] + list(args.overrides)
  if args.precision:
    overrides.append(f"precision.policy={args.precision}")
  if args.steps is not None:  # --steps 0 is an error, not "the preset's steps"
    overrides.append(f"train.steps={args.steps}")
  if args.task:
    overrides.append(f"train.task={args.task}")
  if args.init_from:
    overrides.append(f"train.init_from={os.path.abspath(args.init_from)}")
  if getattr(args, "teacher", None):  # train only
    overrides.append(f"train.teacher={os.path.abspath(args.teacher)}")
  config = apply_overrides(config, overrides)
  if paths:
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, paths=tuple(paths)))
  if args.mesh:
    config = dataclasses.replace(config, mesh=parse_mesh(args.mesh))
  return config


def _init_from_config(args: argparse.Namespace) -> Config | None:
  """A new fine-tuning run without --preset starts from its --init-from run's config
  (an imported checkpoint's architecture), with train.init_from set below."""
  from llm_mp.rundir import stored_config  # pylint: disable=import-outside-toplevel

  return stored_config(args.init_from) if args.init_from else None
