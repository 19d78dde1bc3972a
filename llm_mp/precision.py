"""Mixed-precision policies as values.

A :class:`Precision` is a base :class:`jmp.Policy` (param / compute / output
dtype) plus per-module overrides keyed by module-path patterns, plus the matmul
formats below 16 bits (``llm_mp.formats``). It is passed into every module as
an attribute; each module looks up its own policy by its path with
:func:`module_policy`. Nothing here is global. Loss scaling is not part of it:
:func:`loss_scale_kind` resolves a run's kind from ``precision.loss_scale``.

Kept in float32 whatever the preset (each is tested in tests/test_model.py):
  * norm statistics (``*norm*`` override: compute in fp32),
  * the MoE router (``*router*`` override),
  * the attention softmax (``jax.nn.dot_product_attention`` always does it),
  * logits returned by the LM head (``lm_head`` override: output fp32),
  * class logits returned by the encoder's classifier (``classifier``
    override: output fp32; the mean pooling before it also sums in fp32),
  * start/end logits of the encoder's span head (``span_head`` override),
  * the loss (``llm_mp.step`` casts logits to fp32 before the cross-entropy).
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import jmp
import numpy as np

from llm_mp.config import LOSS_SCALES, PrecisionConfig

DTYPES: Mapping[str, Any] = {
  "float32": jnp.float32,
  "fp32": jnp.float32,
  "f32": jnp.float32,
  "full": jnp.float32,
  "bfloat16": jnp.bfloat16,
  "bf16": jnp.bfloat16,
  "float16": jnp.float16,
  "fp16": jnp.float16,
  "f16": jnp.float16,
  "half": jnp.float16,
  # float64 needs jax_enable_x64; used for reference computations in tests.
  "float64": jnp.float64,
  "fp64": jnp.float64,
  "f64": jnp.float64,
}


def parse_dtype(name: str, field: str = "dtype") -> Any:
  """'bf16' -> jnp.bfloat16; ValueError naming ``field`` and listing valid names."""
  key = str(name).strip().lower()
  if key not in DTYPES:
    raise ValueError(f"unknown {field} {name!r}; valid: {sorted(DTYPES)}")
  return DTYPES[key]


def dtype_name(dtype: Any) -> str:
  return np.dtype(dtype).name


def _parse_policy_fields(spec: str, base: jmp.Policy) -> jmp.Policy:
  """'c=f32,o=bf16' (any subset of p/c/o) or a bare dtype (= compute) applied to ``base``."""
  fields = {
    "p": "param_dtype",
    "params": "param_dtype",
    "param": "param_dtype",
    "c": "compute_dtype",
    "compute": "compute_dtype",
    "o": "output_dtype",
    "output": "output_dtype",
  }
  if "=" not in spec:
    return dataclasses.replace(base, compute_dtype=_policy_dtype(spec, "override dtype"))
  changes = {}
  for part in spec.split(","):
    if "=" not in part:
      raise ValueError(f"policy field {part!r} in {spec!r} is not of the form key=dtype")
    key, value = (s.strip() for s in part.split("=", 1))
    if key not in fields:
      raise ValueError(f"unknown policy field {key!r} in {spec!r}; valid: p, c, o")
    changes[fields[key]] = _policy_dtype(value, f"policy field {key!r}")
  return dataclasses.replace(base, **changes)


def _policy_dtype(text: str, what: str) -> Any:
  """:func:`parse_dtype`, refusing float64 where JAX would silently compute in float32."""
  dtype = parse_dtype(text, what)
  if jnp.dtype(dtype) == jnp.float64 and jax.dtypes.canonicalize_dtype(jnp.float64) != jnp.float64:
    raise ValueError(
      f"{what} {text!r}: float64 needs JAX's 64-bit mode (JAX_ENABLE_X64=1); without it "
      "JAX computes in float32. Use f32"
    )
  return dtype


def _policy_str(p: jmp.Policy) -> str:
  return (
    f"p={dtype_name(p.param_dtype)},c={dtype_name(p.compute_dtype)},o={dtype_name(p.output_dtype)}"
  )


# Overrides every preset starts from; later entries win over earlier ones.
DEFAULT_OVERRIDES: tuple[tuple[str, str], ...] = (
  ("*norm*", "c=f32"),  # mean/variance in fp32; output back to the stream's dtype
  ("*router*", "c=f32,o=f32"),  # MoE routing probabilities in fp32
  ("lm_head", "o=f32"),  # logits leave the model in fp32 for the loss
  ("classifier", "o=f32"),  # so do the encoder's class logits
  ("span_head", "o=f32"),  # and its answer-span start/end logits
)

# preset -> (base policy string, loss scaling)
PRESETS: Mapping[str, tuple[str, str]] = {
  "fp32": ("p=f32,c=f32,o=f32", "none"),
  "bf16": ("p=f32,c=bf16,o=bf16", "none"),
  "fp16": ("p=f32,c=f16,o=f16", "dynamic"),
  "pure_bf16": ("p=bf16,c=bf16,o=bf16", "none"),
}


@dataclasses.dataclass(frozen=True)
class Precision:
  """A base dtype policy, per-module overrides and matmul formats.

  Loss scaling is a separate concern: :func:`loss_scale_kind` (the kind) and
  :mod:`llm_mp.loss_scale` (the value the train state carries).

  Attributes:
    name: the preset or spec it was built from (for logs).
    base: policy of every module no override matches.
    overrides: ``(pattern, policy)`` pairs; a module whose '/'-joined path
      matches ``pattern`` (fnmatch) takes ``policy``. The last match wins.
    formats: ``(pattern, format)`` pairs naming the matmul format of the
      modules whose path matches (``llm_mp.formats.parse_formats`` makes them
      from ``precision.formats``); the last match wins, and no match means ``"none"``.
    protected: fnmatch patterns of modules no format reaches (the first and
      last block and the heads, unless ``precision.format_edges``).
    format_options: the run's precision config, whose format settings
      (``fp8_scaling``, ``group_size``, ...) the formats read.
  """

  name: str
  base: jmp.Policy
  overrides: tuple[tuple[str, jmp.Policy], ...] = ()
  formats: tuple[tuple[str, str], ...] = ()
  protected: tuple[str, ...] = ()
  format_options: PrecisionConfig = PrecisionConfig()

  def for_path(self, path: str) -> jmp.Policy:
    """The policy of the module at ``path`` ('blocks_0/attn/query')."""
    policy = self.base
    for pattern, override in self.overrides:
      if fnmatch.fnmatchcase(path, pattern):
        policy = override
    return policy

  def format_for(self, path: str) -> str:
    """The matmul format of the module at ``path`` (``"none"``: the dtype policy alone)."""
    if any(fnmatch.fnmatchcase(path, pattern) for pattern in self.protected):
      return "none"
    fmt = "none"
    for pattern, name in self.formats:
      if fnmatch.fnmatchcase(path, pattern):
        fmt = name
    return fmt

  @property
  def param_dtype(self) -> Any:
    return self.base.param_dtype

  @property
  def compute_dtype(self) -> Any:
    return self.base.compute_dtype

  def describe(self, modules: Sequence[str] | None = None) -> str:
    """The policy, its overrides and formats, one per line; with ``modules`` (the
    model's module paths) only the overrides that match one of them."""
    lines = [f"precision {self.name}: {_policy_str(self.base)}"]
    lines += [
      f"  {pat}: {_policy_str(p)}"
      for pat, p in self.overrides
      if modules is None or any(fnmatch.fnmatchcase(m, pat) for m in modules)
    ]
    lines += [f"  {pat}: matmul format {fmt}" for pat, fmt in self.formats]
    if self.formats and self.protected:
      lines.append(f"  no format reaches: {', '.join(self.protected)}")
    return "\n".join(lines)


def _policy_spec(spec: str) -> tuple[str, str]:
  """(policy string, the loss scaling it wants) of a preset or a policy string."""
  key = spec.strip().lower()
  if key in PRESETS:
    return PRESETS[key]
  if "=" in key:
    return key, "none"
  raise ValueError(
    f"unknown precision {spec!r}; valid presets: {sorted(PRESETS)}, "
    "or a policy string like 'p=f32,c=bf16,o=bf16'"
  )


def loss_scale_kind(spec: str, loss_scale: str | None = "auto") -> str:
  """The loss scaling of a run: ``loss_scale`` ("none", "static", "dynamic"), or for
  "auto"/None the one the policy ``spec`` wants (dynamic for fp16, else none)."""
  if loss_scale in (None, "auto"):
    return _policy_spec(spec)[1]
  if loss_scale not in LOSS_SCALES:
    raise ValueError(f"unknown loss_scale {loss_scale!r}; valid: {list(LOSS_SCALES)}")
  return loss_scale


def make_precision(
  spec: str = "fp32",
  overrides: str | None = None,
  formats: tuple[tuple[str, str], ...] = (),
  protected: tuple[str, ...] = (),
  format_options: PrecisionConfig = PrecisionConfig(),
) -> Precision:
  """Builds a :class:`Precision` from a preset or a jmp policy string.

  Args:
    spec: a preset name (``fp32``, ``bf16``, ``fp16``, ``pure_bf16``) or a jmp
      string such as ``"p=f32,c=bf16,o=f32"``.
    overrides: extra ``pattern=spec`` entries separated by ';', applied after
      the defaults, e.g. ``"*attn*=f32;lm_head=c=f32,o=f32"``. A bare dtype
      sets the compute dtype; ``p=,c=,o=`` set any subset of the three.
    formats: ``(pattern, format)`` pairs, as :func:`llm_mp.formats.parse_formats`
      makes them (it checks the format names; this module knows none).
    protected: module patterns no format reaches.
    format_options: the precision config whose format settings the formats read.

  Raises:
    ValueError: unknown preset, dtype or policy field.
  """
  base_str = _policy_spec(spec)[0]
  base = _parse_policy_fields(base_str, jmp.Policy(jnp.float32, jnp.float32, jnp.float32))
  entries = list(DEFAULT_OVERRIDES)
  for item in (overrides or "").split(";"):
    if item.strip():
      if "=" not in item:
        raise ValueError(f"precision override {item!r} is not of the form pattern=dtype")
      pattern, value = item.split("=", 1)
      entries.append((pattern.strip(), value.strip()))
  # Each override changes only the fields it names, on top of what the earlier entries give
  # its pattern: "lm_head=c=f32" under bf16 keeps the default fp32 logits (o=f32).
  resolved: list[tuple[str, jmp.Policy]] = []
  for pat, val in entries:
    start = base
    for earlier, policy in resolved:
      if fnmatch.fnmatchcase(pat, earlier):
        start = policy
    resolved.append((pat, _parse_policy_fields(val, start)))
  resolved = tuple(resolved)
  return Precision(
    name=spec,
    base=base,
    overrides=resolved,
    formats=tuple(formats),
    protected=tuple(protected),
    format_options=format_options,
  )


def module_path(module) -> str:
  """The '/'-joined path of a bound flax module ('' for the top-level module)."""
  return "/".join(str(p) for p in module.scope.path)


def module_policy(module) -> jmp.Policy:
  """The policy for a bound flax module that has a ``precision`` attribute."""
  return module.precision.for_path(module_path(module))


def precision_report(model, params_shape: Any, *args, **kwargs) -> dict[str, dict[str, str]]:
  """What dtype each parameter has and each module computes and returns in.

  Runs ``model.apply`` abstractly (no FLOPs) with intermediates captured.

  Args:
    model: a flax module with a ``precision`` attribute.
    params_shape: the params (or their ``jax.eval_shape``) as from ``model.init``.
    *args, **kwargs: example inputs for ``model.apply``.

  Returns:
    ``{"params": {path: dtype}, "modules": {path: "compute=..., output=..., format=..."}}``
    (``format``: the matmul format the module's path resolves to,
    ``llm_mp.formats``; it changes only modules with a weight matmul).
  """
  variables = {"params": params_shape} if "params" not in params_shape else params_shape
  _, state = jax.eval_shape(
    lambda v: model.apply(
      v, *args, capture_intermediates=True, mutable=["intermediates"], **kwargs
    ),
    variables,
  )
  params = {
    "/".join(str(getattr(k, "key", k)) for k in path): dtype_name(leaf.dtype)
    for path, leaf in jax.tree_util.tree_leaves_with_path(variables["params"])
  }
  modules = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(state["intermediates"]):
    keys = [str(getattr(k, "key", k)) for k in path]
    if "__call__" not in keys:
      continue
    mod = "/".join(keys[: keys.index("__call__")])
    if mod in modules:  # modules returning tuples: report the first output
      continue
    policy = model.precision.for_path(mod)
    modules[mod] = (
      f"compute={dtype_name(policy.compute_dtype)}, output={dtype_name(leaf.dtype)}, "
      f"format={model.precision.format_for(mod)}"
    )
  return {"params": params, "modules": modules}
