"""Numerics diagnostics: where a model's numbers sit against each format's range.

For a model and a batch (or a trained run, :func:`diagnose_run`), per layer:

* histograms of the base-2 exponents (``floor(log2 |x|)``) of activations
  (every module's ``__call__`` output), weights, parameter gradients and
  activation gradients, where gradients are those of the SCALED loss
  ``S * loss`` (as the 2018 mixed-precision paper plots them; ``S`` is the
  loss scale);
* the fraction of entries that a cast to fp16, bf16, fp8 e4m3 or fp8 e5m2
  would flush to zero, make subnormal, or overflow
  (:func:`llm_mp.format_ranges.classify`; the thresholds are in
  :class:`llm_mp.format_ranges.FormatRange`);
* per policy (fp32, bf16, fp16, pure_bf16), the relative error
  ``||x - ref|| / ||ref||`` of every activation and parameter gradient
  against a float64 run of the same weights (:func:`policy_errors`);
* the classic figure (:func:`llm_mp.numerics_plot.plot_gradient_exponents`):
  the gradient-exponent histogram against each format's normal and subnormal
  bands, with the loss scale's shift marked. ``llm-mp diagnose --workdir RUN``
  writes it as ``diagnose.png`` with everything above in ``diagnose.json``
  (:func:`llm_mp.numerics_plot.write_report`).

Activation gradients are read with a zero "probe" added to every module's
output (a flax method interceptor): the gradient with respect to the probe is
the gradient flowing into that output, in the output's dtype. The model code
is unchanged. Scanned stacks are unrolled (``blocks/block`` -> ``blocks_i``) so
each layer is reported on its own; numerics are the same ops either way.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import jmp
import numpy as np

from llm_mp.config import ModelConfig
from llm_mp.format_ranges import FORMATS, format_fractions, format_range, tensor_stats
from llm_mp.formats import require_float_weights
from llm_mp.models import build_resolved_model
from llm_mp.precision import Precision, loss_scale_kind, make_precision
from llm_mp.rundir import load_run
from llm_mp.tasks import Task, task_spec

POLICIES = ("fp32", "bf16", "fp16", "pure_bf16")
KINDS = ("activations", "weights", "gradients", "activation_gradients")
LOGITS = "logits"  # the name of the model's own output (module path '')
_PROBES = "numerics_probes"  # zero added to every module output: its gradient is the output's
_ACTS = "numerics_activations"  # every module output, captured on the first pass
_LEAF = "numerics_out"  # the variable name ('out' would collide with submodules so named)


# --- capturing activations and gradients -------------------------------------------------


def _probe(next_fun, args, kwargs, context):
  """Method interceptor: records each module output and adds a zero probe to it."""
  out = next_fun(*args, **kwargs)
  module = context.module
  if (
    context.method_name != "__call__"
    or isinstance(module, nn.Dropout)  # eval: identity
    or not isinstance(out, jax.Array)
    or not jnp.issubdtype(out.dtype, jnp.floating)
  ):
    return out
  if module.is_mutable_collection(_ACTS):
    module.put_variable(_ACTS, _LEAF, out)
  # put/get_variable, not variable(): they work outside compact methods and setup.
  if not module.has_variable(_PROBES, _LEAF) and module.is_mutable_collection(_PROBES):
    module.put_variable(_PROBES, _LEAF, jnp.zeros_like(out))
  if module.has_variable(_PROBES, _LEAF):
    probe = module.get_variable(_PROBES, _LEAF)
    if probe.shape == out.shape:  # a module called twice with other shapes: probe the first
      out = out + probe.astype(out.dtype)
  return out


def _paths(tree: Any, drop_last: bool = False) -> dict[str, Any]:
  """A nested dict -> ``{"a/b/c": leaf}`` (dropping the leaf's own key when asked)."""
  flat = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    keys = [str(getattr(k, "key", k)) for k in path]
    name = "/".join(keys[:-1] if drop_last else keys)
    flat[name or LOGITS] = leaf
  return flat


def unscan_params(params: Any, n_layers: int) -> Any:
  """Params of a scanned stack (``.../blocks/block/...`` with a leading
  ``[n_layers]`` axis) as those of the unrolled stack (``.../blocks_i/...``)."""
  if not isinstance(params, Mapping):
    return params
  out = {}
  for key, value in params.items():
    if key == "blocks" and isinstance(value, Mapping) and "block" in value:
      for i in range(n_layers):
        out[f"blocks_{i}"] = jax.tree.map(lambda x, i=i: x[i], value["block"])
    else:
      out[key] = unscan_params(value, n_layers)
  return out


def diagnostic_model(
  model_config: ModelConfig, precision: Precision, head: str = "lm"
) -> nn.Module:
  """The model of ``model_config`` unrolled (no scan, no remat): one module per layer,
  its "auto" choices resolved as the builder resolves them."""
  cfg = dataclasses.replace(model_config, scan_layers=False, remat="none", dropout=0.0)
  return build_resolved_model(cfg, precision, head=head)


@dataclasses.dataclass
class Capture:
  """What one forward and backward pass produced, on the host.

  Every dict maps a path ('decoder/blocks_0/attn', 'decoder/blocks_0/attn/
  query/kernel'; ``"logits"`` for the model's output) to an array in the dtype
  it had on the device (bf16 as ``ml_dtypes.bfloat16``).

  Attributes:
    loss: the unscaled loss (float).
    loss_scale: ``S``; ``gradients`` and ``activation_gradients`` are those
      of ``S * loss``.
    activations: every module's output.
    weights: every parameter.
    gradients: d(S * loss) / d parameter.
    activation_gradients: d(S * loss) / d module output.
  """

  loss: float
  loss_scale: float
  activations: dict[str, np.ndarray]
  weights: dict[str, np.ndarray]
  gradients: dict[str, np.ndarray]
  activation_gradients: dict[str, np.ndarray]

  def kind(self, name: str) -> dict[str, np.ndarray]:
    return getattr(self, name)


def capture(
  model: nn.Module,
  params: Any,
  batch: Mapping[str, Any],
  task: Task,
  loss_scale: float = 1.0,
  model_state: Mapping[str, Any] | None = None,
) -> Capture:
  """Runs ``task``'s loss on ``batch`` forward and backward, recording every
  module output, parameter and their gradients (of ``loss_scale * loss``).

  Args:
    model: an unscanned model (see :func:`diagnostic_model`); its precision
      policy decides every dtype, as in training.
    params: its parameters (any dtype; used as given).
    batch: the task's batch (``task.batch_axes`` keys, leading axis ``B``).
    task: the loss (evaluated deterministically: no dropout, fixed MLM masks).
    loss_scale: ``S``; multiplies the fp32 loss before differentiation, as
      the train step does.
    model_state: extra non-parameter collections (e.g. fp8 scales).

  Returns:
    A :class:`Capture` on the host.
  """
  state = dict(model_state or {})

  def scaled_loss(p, probe):
    with nn.intercept_methods(_probe):
      loss, aux = task.loss_fn(
        model, {"params": p, _PROBES: probe, _ACTS: {}, **state}, batch, None
      )
    written = aux["model_state"]
    return loss * jnp.asarray(loss_scale, loss.dtype), (loss, written[_ACTS], written[_PROBES])

  # A first, abstract pass creates the probes (zeros shaped as each output).
  shapes = jax.eval_shape(scaled_loss, params, {})[1][2]
  probes = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)  # host: no compile
  (grads, probe_grads), (loss, acts, _) = jax.jit(
    jax.grad(scaled_loss, argnums=(0, 1), has_aux=True)
  )(params, probes)
  host = lambda tree, drop: {
    k: np.asarray(v) for k, v in _paths(jax.device_get(tree), drop).items()
  }
  return Capture(
    float(loss),
    float(loss_scale),
    host(acts, True),
    host(params, False),
    host(grads, False),
    host(probe_grads, True),
  )


# --- errors against float64 -----------------------------------------------------------------


def _cast(params: Any, dtype: Any) -> Any:
  """Params rounded to ``dtype`` on the host (numpy: no per-shape compiles)."""
  return jax.tree.map(lambda p: np.asarray(p).astype(dtype), params)


def relative_error(x: Any, ref: Any, floor: float = 0.0) -> float | None:
  """``||x - ref|| / ||ref||`` (Frobenius, in float64); None when ``||ref|| <= floor``
  (the ratio of two rounding noises says nothing)."""
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  denom = float(np.linalg.norm(ref.ravel()))
  return None if denom <= floor else float(np.linalg.norm((x - ref).ravel())) / denom


def _float64_capture(
  model_config: ModelConfig, head: str, params: Any, batch, task: Task
) -> Capture:
  # Every dtype float64 and no fp32 overrides (as tests/test_model.py's reference).
  # The task's cross-entropy still casts the logits to fp32, so the reference
  # gradient at the logits is exact to fp32 rounding (~1e-7 relative).
  f64 = jmp.Policy(jnp.float64, jnp.float64, jnp.float64)
  with jax.enable_x64(True):
    model = diagnostic_model(model_config, Precision("f64", f64), head)
    p64 = jax.tree.map(lambda p: np.asarray(p, np.float64), params)
    return capture(model, p64, batch, task, 1.0)


def _flat(arrays: Mapping[str, Any]) -> np.ndarray:
  return np.concatenate([np.asarray(arrays[k], np.float64).ravel() for k in sorted(arrays)])


def policy_errors(
  model_config: ModelConfig,
  params: Any,
  batch: Mapping[str, Any],
  task: Task,
  policies: Sequence[str] = POLICIES,
  loss_scale: float = 2.0**15,
) -> dict[str, dict[str, Any]]:
  """Relative error of each policy's activations and gradients against float64.

  The same weights (``params`` rounded to each policy's parameter dtype) and
  batch run under each policy and under an all-float64 model.

  Args:
    model_config: the architecture (its family builds the model).
    params: fp32 (or any float) parameters of that architecture, unscanned.
    batch, task: as for :func:`capture`.
    policies: precision presets or policy strings.
    loss_scale: the scale for policies that scale the loss (fp16); others use
      1. Gradients are divided by it before they are compared.

  Returns:
    ``{policy: {"loss", "logits", "gradients_total": rel. errors (float),
    "activations": {module path: rel. error}, "gradients": {param path:
    rel. error or None}}}``; the error of the whole gradient vector is
    ``gradients_total``. A parameter whose float64 gradient norm is below
    1e-9 of the whole gradient's (zero in exact arithmetic) gets None.
  """
  ref = _float64_capture(model_config, task.head, params, batch, task)
  ref_flat = _flat(ref.gradients)
  # A parameter whose exact gradient is zero (a key bias: softmax ignores a
  # shift shared by all keys) has a float64 gradient of pure rounding noise;
  # below this norm its relative error is reported as None.
  floor = 1e-9 * float(np.linalg.norm(ref_flat))
  out = {}
  for name in policies:
    precision = make_precision(name)
    scale = loss_scale if loss_scale_kind(name) != "none" else 1.0
    model = diagnostic_model(model_config, precision, task.head)
    cast = _cast(params, precision.param_dtype)
    cap = capture(model, cast, batch, task, scale)
    grads = {k: np.asarray(v, np.float64) / scale for k, v in cap.gradients.items()}
    out[name] = {
      "loss": abs(cap.loss - ref.loss) / abs(ref.loss),
      # Only the real vocabulary: padded columns (model.vocab_multiple) hold the same
      # large negative constant under every policy and would swamp the norm.
      "logits": relative_error(
        cap.activations[LOGITS][..., : model_config.vocab_size],
        ref.activations[LOGITS][..., : model_config.vocab_size],
      ),
      "gradients_total": relative_error(_flat(grads), ref_flat),
      "activations": {k: relative_error(v, ref.activations[k]) for k, v in cap.activations.items()},
      "gradients": {k: relative_error(v, ref.gradients[k], floor) for k, v in grads.items()},
    }
  return out


# --- the report -------------------------------------------------------------------------------


def summarize(cap: Capture, formats: Sequence[str] = tuple(FORMATS)) -> dict[str, Any]:
  """Histograms and format fractions of a :class:`Capture`, per layer and pooled.

  Returns:
    ``{"loss", "loss_scale", "layers": {kind: {path: tensor_stats}},
    "totals": {kind: tensor_stats}}`` for each kind of :data:`KINDS` (a
    gradient layer also has ``formats_unscaled``: the fractions of its
    gradients divided by the scale), plus
    ``totals["gradients_unscaled"]`` and ``totals["activation_gradients_unscaled"]``
    (the same gradients divided by the scale, in float64: what the gradients
    of the unscaled loss are).
  """
  layers, totals = {}, {}
  for kind in KINDS:
    arrays = cap.kind(kind)
    layers[kind] = {k: tensor_stats(v, formats) for k, v in arrays.items()}
    if "gradients" in kind:  # what the same layer's gradients of the unscaled loss would do
      for k, v in arrays.items():
        layers[kind][k]["formats_unscaled"] = format_fractions(
          np.asarray(v, np.float64) / cap.loss_scale, formats
        )
    pooled = np.concatenate([np.asarray(v, np.float64).ravel() for v in arrays.values()])
    totals[kind] = tensor_stats(pooled, formats)
    if "gradients" in kind:
      totals[f"{kind}_unscaled"] = tensor_stats(pooled / cap.loss_scale, formats)
  return {"loss": cap.loss, "loss_scale": cap.loss_scale, "layers": layers, "totals": totals}


def diagnose(
  model_config: ModelConfig,
  params: Any,
  batch: Mapping[str, Any],
  task: Task,
  loss_scale: float = 1.0,
  precision: str = "fp32",
  policies: Sequence[str] = POLICIES,
) -> dict[str, Any]:
  """The full report for a model + batch (JSON-serialisable).

  Args:
    model_config: the architecture; a scanned stack is unrolled.
    params: its parameters (scanned or not).
    batch, task: as for :func:`capture`.
    loss_scale: ``S`` applied to the loss before the gradients are taken.
    precision: the policy the histograms are measured under. "fp32" (the
      default) shows the values the gradients really have, i.e. what a
      lower-precision cast would have to hold, as in the 2018 paper; the run's
      own policy shows what it computed.
    policies: compared against float64 (empty: skip).

  Returns:
    ``{"precision", "formats": {name: FormatRange fields}, **summarize(...),
    "policy_errors": policy_errors(...)}``.
  """
  if model_config.scan_layers:
    params = unscan_params(params, model_config.n_layers)
  prec = make_precision(precision)
  model = diagnostic_model(model_config, prec, task.head)
  cast = _cast(params, prec.param_dtype)
  report = {
    "precision": precision,
    "formats": {n: dataclasses.asdict(format_range(n)) for n in FORMATS},
    **summarize(capture(model, cast, batch, task, loss_scale)),
  }
  if policies:
    report["policy_errors"] = policy_errors(
      model_config, params, batch, task, policies, loss_scale=loss_scale
    )
  return report


def run_batch(run: Any, batch_size: int) -> dict[str, np.ndarray]:
  """The first ``batch_size`` rows of the validation data of ``run`` (a
  :class:`llm_mp.rundir.LoadedRun`), as its task's batch (nothing is written)."""
  spec = task_spec(run.config)
  config = dataclasses.replace(
    run.config, train=dataclasses.replace(run.config.train, batch_size=batch_size)
  )
  prepared = spec.data.prepare(config, run.workdir, run.tokenizer, write=False)
  batch = next(iter(spec.data.eval_batches(prepared, config, 1, "val")))
  return {k: np.asarray(v) for k, v in batch.items()}


def last_loss_scale(workdir: str) -> float:
  """The loss scale of the run's last logged step (1.0 when none is logged)."""
  from llm_mp.metrics import read_metrics  # pylint: disable=import-outside-toplevel

  scales = [r["loss_scale"] for r in read_metrics(workdir) if "loss_scale" in r]
  return float(scales[-1]) if scales else 1.0


def diagnose_run(
  workdir: str,
  loss_scale: float | None = None,
  batch_size: int = 4,
  precision: str = "fp32",
  policies: Sequence[str] = POLICIES,
) -> dict[str, Any]:
  """:func:`diagnose` for the latest checkpoint of run ``workdir`` on the
  first ``batch_size`` validation rows.

  ``loss_scale`` None: the scale of the run's last logged step (its dynamic
  scale, if it had one), else 1. The report also has ``run``, ``step`` and
  ``run_precision``.
  """
  scale = last_loss_scale(workdir) if loss_scale is None else float(loss_scale)
  if not scale > 0 or not math.isfinite(scale):
    raise ValueError(f"--loss-scale={loss_scale}: must be a positive finite number")
  if batch_size < 1:
    raise ValueError(f"--batch-size={batch_size}: must be at least 1")
  run = load_run(workdir)
  require_float_weights(run.precision, workdir, "diagnose")
  params = jax.device_get(run.params)
  batch = run_batch(run, batch_size)
  report = diagnose(run.config.model, params, batch, run.recipe.task, scale, precision, policies)
  return {
    "run": os.path.basename(os.path.abspath(workdir)),
    "step": run.step,
    "run_precision": run.config.precision.policy,
    **report,
  }


def summary_lines(report: Mapping[str, Any]) -> list[str]:
  """A few lines of a :func:`diagnose_run` report for the terminal: the loss, the pooled
  fraction of each kind of tensor that flushes to zero or overflows in each format,
  and each policy's relative error against float64 (loss, whole gradient)."""
  lines = [
    f"{report['run']} step {report['step']} ({report['run_precision']}): loss "
    f"{report['loss']:.4g} under {report['precision']}, loss scale {report['loss_scale']:g}"
  ]
  for kind in KINDS:
    fractions = report["totals"][kind]["formats"]
    parts = [f"{n} {f['flush']:.2%}/{f['overflow']:.2%}" for n, f in fractions.items()]
    lines.append(f"  {kind} flush/overflow: {', '.join(parts)}")
  for name, errors in report.get("policy_errors", {}).items():
    lines.append(
      f"  {name} vs float64: loss {errors['loss']:.1e}, gradients "
      f"{errors['gradients_total']:.1e} (relative error)"
    )
  return lines
