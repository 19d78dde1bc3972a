"""Tasks: what a batch holds, how each of its keys is sharded, and the loss.

A :class:`Task` is plain data: the model head it reads, the logical axes of
every batch key (so ``llm_mp.sharding`` can place a ``labels [B]`` array as
well as ``inputs [B, T]``), and a loss function

  ``loss_fn(model, variables, batch, rng) -> (loss, aux)``

* ``variables``: ``{"params": ..., **non-parameter collections}`` (the train
  state's ``model_state``, e.g. fp8 scales);
* ``rng``: a PRNG key in training (dropout, MLM masking), None in evaluation
  (deterministic: no dropout, fixed MLM masks);
* ``loss``: fp32 scalar to minimise: the task's mean loss over the batch's
  counted units, plus the auxiliary losses the modules recorded (MoE load
  balancing, router z-loss) and the logit z-loss;
* ``aux``: fp32 metrics: ``weight`` (the number of counted units: tokens or
  examples, used to combine micro-batches exactly), ``loss`` (the task loss
  alone), any task metric (``accuracy``), the modules' recorded metrics, and
  ``model_state`` (the updated non-parameter collections).

Modules record auxiliary terms with ``self.sow("losses", name, value)``
(already weighted; summed into the loss) and diagnostics with
``self.sow("metrics", name, value)`` (averaged over layers): see
:func:`apply_model`.

Registered tasks (:data:`TASKS`): ``lm`` (next-token cross-entropy, decoders),
``mlm`` (masked LM, encoders), ``classify`` (sequence classification),
``seq2seq`` (teacher-forced target cross-entropy, encoder-decoders).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from llm_mp.config import Config

Batch = dict[str, jax.Array]
LossFn = Callable[[nn.Module, Any, Batch, "jax.Array | None"], tuple[jax.Array, dict]]
# Collections a forward pass writes that are not state: recorded losses and metrics.
TRANSIENT_COLLECTIONS = ("losses", "metrics", "intermediates", "cache")

TOKEN_AXES = ("batch", "length")
LM_BATCH_AXES: Mapping[str, tuple[str, ...]] = {
  "inputs": TOKEN_AXES,
  "targets": TOKEN_AXES,
  "segment_ids": TOKEN_AXES,
  "positions": TOKEN_AXES,
}


@dataclasses.dataclass(frozen=True)
class Task:
  """A training objective.

  Attributes:
    name: the ``train.task`` value.
    head: the model head the loss reads ("lm": per-token vocabulary logits,
      "classify": one row of class logits per sequence).
    batch_axes: logical axes of every batch key (a key not listed is an error
      when the batch is sharded).
    loss_fn: see the module docstring.
    unit: what ``aux["weight"]`` counts ("tokens" or "examples"); the metric
      of that name reports it.
    perplexity: whether ``exp(loss)`` is meaningful (token-level losses).
  """

  name: str
  head: str
  batch_axes: Mapping[str, tuple[str | None, ...]]
  loss_fn: LossFn
  unit: str = "tokens"
  perplexity: bool = True


def _stacked_over_layers(path: tuple) -> bool:
  # nn.scan stacks what a scanned block sows along a leading layer axis; the
  # scanned stack is the module named "blocks" (llm_mp.models.transformer.Stack).
  return any(getattr(k, "key", None) == "blocks" for k in path)


def collect_sown(losses: Any, metrics: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Sums the sown ``losses`` and averages the sown ``metrics`` by name.

  Args:
    losses, metrics: the "losses" / "metrics" collections returned by
      ``model.apply(..., mutable=[...])`` (tuples of sown values, nested by
      module path; scanned layers give one stacked array).

  Returns:
    ``(aux_loss, metrics)``: the fp32 sum of every recorded loss term, and for
    each metric name the mean over the layers that recorded it (a sown vector,
    e.g. per-expert load ``[E]``, stays a vector).
  """
  aux_loss = sum(
    (jnp.sum(x, dtype=jnp.float32) for x in jax.tree.leaves(losses)), jnp.zeros((), jnp.float32)
  )
  grouped: dict[str, list[jax.Array]] = {}
  for path, value in jax.tree_util.tree_flatten_with_path(metrics)[0]:
    # The path ends (..., DictKey(name), SequenceKey(i)): sow keeps a tuple per name.
    name = next(k.key for k in reversed(path) if hasattr(k, "key"))
    values = list(value) if _stacked_over_layers(path) else [value]
    grouped.setdefault(name, []).extend(v.astype(jnp.float32) for v in values)
  return aux_loss, {k: sum(v) / len(v) for k, v in grouped.items()}


def apply_model(
  model: nn.Module, variables: Mapping[str, Any], *args, rng: jax.Array | None, **kwargs
) -> tuple[Any, jax.Array, dict[str, jax.Array], dict[str, Any]]:
  """Runs ``model`` and gathers what its modules recorded.

  Args:
    model: a flax module whose ``__call__`` takes ``deterministic``.
    variables: ``{"params": ..., **state collections}``.
    *args, **kwargs: the model's inputs.
    rng: dropout key (training), or None: deterministic.

  Returns:
    ``(outputs, aux_loss, metrics, model_state)``: the model's outputs, the
    fp32 sum of the "losses" collection, the averaged "metrics" collection,
    and the updated non-parameter collections (those in ``variables``).
  """
  state_names = [k for k in variables if k != "params"]
  out, written = model.apply(
    variables,
    *args,
    deterministic=rng is None,
    rngs=None if rng is None else {"dropout": rng},
    mutable=["losses", "metrics", *state_names],
    **kwargs,
  )
  aux_loss, metrics = collect_sown(written.get("losses", {}), written.get("metrics", {}))
  model_state = {k: written[k] for k in state_names if k in written}
  return out, aux_loss, metrics, model_state


def cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array):
  """Token cross-entropy, always in fp32.

  Args:
    logits: ``[..., V]`` any float dtype (cast to fp32 here: the loss is kept
      in fp32 under every policy).
    targets: int ``[...]``; negative entries are ignored.
    mask: ``[...]`` bool or 0/1, extra loss mask (e.g. padding).

  Returns:
    ``(nll_sum, z_sum, count)`` fp32 scalars: summed ``-log p(target)``, summed
    ``log(Z)^2`` (for z-loss) and the number of counted targets.
  """
  logits = logits.astype(jnp.float32)
  weights = (mask.astype(bool) & (targets >= 0)).astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, jnp.maximum(targets, 0)[..., None], axis=-1)[..., 0]
  nll = (log_z - target_logit) * weights
  return nll.sum(), (jnp.square(log_z) * weights).sum(), weights.sum()


def loss_mask(batch: Batch) -> jax.Array:
  """Tokens that count: targets >= 0 and not padding (segment id 0)."""
  mask = batch["targets"] >= 0
  if "segment_ids" in batch:
    mask &= batch["segment_ids"] > 0
  return mask


def _token_loss(logits, targets, mask, aux_loss, metrics, model_state, z_weight):
  """Mean token cross-entropy (+ z-loss + recorded losses) and its aux dict."""
  nll, z, count = cross_entropy(logits, targets, mask)
  n = jnp.maximum(count, 1.0)
  loss = nll / n
  aux = {**metrics, "weight": count, "loss": loss, "model_state": model_state}
  return loss + z_weight * z / n + aux_loss, aux


def lm_loss(model, variables, batch: Batch, rng, *, z_weight: float = 0.0):
  """Next-token prediction. ``batch``: int32 ``inputs, targets`` ``[B, T]``
  (targets -1 are ignored), optional ``segment_ids, positions`` ``[B, T]``."""
  logits, aux_loss, metrics, model_state = apply_model(
    model,
    variables,
    batch["inputs"],
    segment_ids=batch.get("segment_ids"),
    positions=batch.get("positions"),
    rng=rng,
  )
  return _token_loss(
    logits, batch["targets"], loss_mask(batch), aux_loss, metrics, model_state, z_weight
  )


# Eval batches are masked with this fixed key, so evaluations of different
# checkpoints see the same masked positions and are comparable.
_EVAL_MASK_SEED = 0


def mlm_loss(
  model,
  variables,
  batch: Batch,
  rng,
  *,
  probability: float,
  mask_id: int,
  random_ids: tuple[int, int],
  special_ids: tuple[int, ...],
  z_weight: float = 0.0,
):
  """Masked LM (BERT): a random ``probability`` of the real, non-special
  tokens of ``inputs [B, T]`` is selected (80% -> ``mask_id``, 10% -> a random
  token id in ``[random_ids[0], random_ids[1])``, 10% kept) and predicted; the
  loss counts the selected positions only. ``batch`` as for :func:`lm_loss`
  (``targets`` unused)."""
  from llm_mp.data.masking import mlm_mask  # pylint: disable=import-outside-toplevel

  inputs = batch["inputs"]
  maskable = ~jnp.isin(inputs, jnp.asarray(special_ids, inputs.dtype))
  if "segment_ids" in batch:
    maskable &= batch["segment_ids"] > 0
  if rng is None:
    mask_rng, dropout_rng = jax.random.key(_EVAL_MASK_SEED), None
  else:
    mask_rng, dropout_rng = jax.random.split(rng)
  masked, targets = mlm_mask(
    mask_rng,
    inputs,
    maskable,
    probability=probability,
    mask_id=mask_id,
    low=random_ids[0],
    vocab_size=random_ids[1],
  )
  logits, aux_loss, metrics, model_state = apply_model(
    model,
    variables,
    masked,
    segment_ids=batch.get("segment_ids"),
    positions=batch.get("positions"),
    rng=dropout_rng,
  )
  return _token_loss(logits, targets, targets >= 0, aux_loss, metrics, model_state, z_weight)


def classify_loss(model, variables, batch: Batch, rng):
  """Sequence classification. ``batch``: int32 ``inputs, segment_ids,
  positions [B, T]`` and ``labels [B]`` (-1: a padding row, not counted).
  Cross-entropy over the class logits in fp32; ``accuracy`` in aux."""
  logits, aux_loss, metrics, model_state = apply_model(
    model,
    variables,
    batch["inputs"],
    segment_ids=batch.get("segment_ids"),
    positions=batch.get("positions"),
    rng=rng,
  )
  labels = batch["labels"]
  nll, _, count = cross_entropy(logits, labels, jnp.ones_like(labels, bool))
  n = jnp.maximum(count, 1.0)
  correct = ((jnp.argmax(logits, -1) == labels) & (labels >= 0)).sum(dtype=jnp.float32)
  aux = {
    **metrics,
    "weight": count,
    "loss": nll / n,
    "accuracy": correct / n,
    "model_state": model_state,
  }
  return nll / n + aux_loss, aux


# Source and target lengths may differ; both are ("batch", "length") (length is not sharded).
SEQ2SEQ_BATCH_AXES: Mapping[str, tuple[str, ...]] = {
  "inputs": TOKEN_AXES,
  "segment_ids": TOKEN_AXES,
  "positions": TOKEN_AXES,
  "decoder_inputs": TOKEN_AXES,
  "decoder_segment_ids": TOKEN_AXES,
  "decoder_positions": TOKEN_AXES,
  "targets": TOKEN_AXES,
}


def seq2seq_loss(model, variables, batch: Batch, rng, *, z_weight: float = 0.0):
  """Teacher-forced text-to-text. ``batch``: int32 source ``inputs, segment_ids
  [B, S]``, target ``decoder_inputs, decoder_segment_ids, targets [B, T]``
  (``decoder_inputs`` = BOS + targets shifted right; ``targets`` -1 and
  ``decoder_segment_ids`` 0 on padding, neither counted), optional
  ``positions [B, S]`` / ``decoder_positions [B, T]``. Mean cross-entropy
  over the real target tokens; ``accuracy`` (argmax == target) in aux."""
  logits, aux_loss, metrics, model_state = apply_model(
    model,
    variables,
    batch["inputs"],
    segment_ids=batch.get("segment_ids"),
    decoder_inputs=batch["decoder_inputs"],
    decoder_segment_ids=batch.get("decoder_segment_ids"),
    positions=batch.get("positions"),
    decoder_positions=batch.get("decoder_positions"),
    rng=rng,
  )
  targets = batch["targets"]
  mask = targets >= 0
  if "decoder_segment_ids" in batch:
    mask &= batch["decoder_segment_ids"] > 0
  loss, aux = _token_loss(logits, targets, mask, aux_loss, metrics, model_state, z_weight)
  correct = ((jnp.argmax(logits, -1) == targets) & mask).sum(dtype=jnp.float32)
  aux["accuracy"] = correct / jnp.maximum(aux["weight"], 1.0)
  return loss, aux


def task_name(config: Config) -> str:
  """``train.task``, with "auto" resolved to the model family's default."""
  if config.train.task != "auto":
    return config.train.task
  return {"encoder": "mlm", "encoder_decoder": "seq2seq"}.get(config.model.family, "lm")


def make_task(config: Config, tokenizer: Any = None) -> Task:
  """The :class:`Task` of ``config.train.task``.

  Args:
    config: the run's config.
    tokenizer: the run's tokenizer; ``mlm`` needs its ``pad_id``, ``bos_id``,
      ``eos_id`` and ``vocab_size`` (the pad id doubles as [MASK]; see
      ``llm_mp.data.masking``).

  Raises:
    ValueError: an unknown task, a task the model family cannot run, or
      ``mlm`` without a tokenizer.
  """
  name = task_name(config)
  t = config.train
  if name == "lm":
    if config.model.family != "decoder":
      raise ValueError(
        f"train.task='lm' needs model.family='decoder', got "
        f"{config.model.family!r} (encoders train with 'mlm')"
      )
    return Task("lm", "lm", LM_BATCH_AXES, functools.partial(lm_loss, z_weight=t.z_loss))
  if name == "mlm":
    if config.model.family != "encoder":
      raise ValueError(
        f"train.task='mlm' needs model.family='encoder', got {config.model.family!r}"
      )
    if tokenizer is None:
      raise ValueError("train.task='mlm' needs the tokenizer (its pad/bos/eos ids)")
    tok = tokenizer
    specials = sorted((tok.pad_id, tok.bos_id, tok.eos_id))
    # Random replacements are ordinary tokens: the specials sit at the start
    # (BPE: 0..2) or the end (bytes: 256..258) of the vocabulary.
    low, high = (specials[-1] + 1, tok.vocab_size) if specials[0] == 0 else (0, specials[0])
    loss = functools.partial(
      mlm_loss,
      probability=t.mlm_probability,
      mask_id=tok.pad_id,
      random_ids=(low, high),
      z_weight=t.z_loss,
      special_ids=tuple(specials),
    )
    return Task("mlm", "lm", LM_BATCH_AXES, loss)
  if name == "classify":
    if config.model.family != "encoder":
      raise ValueError(
        f"train.task='classify' needs model.family='encoder', got {config.model.family!r}"
      )
    axes = {
      "inputs": TOKEN_AXES,
      "segment_ids": TOKEN_AXES,
      "positions": TOKEN_AXES,
      "labels": ("batch",),
    }
    return Task("classify", "classify", axes, classify_loss, unit="examples", perplexity=False)
  if name == "seq2seq":
    if config.model.family != "encoder_decoder":
      raise ValueError(
        f"train.task='seq2seq' needs model.family='encoder_decoder', got {config.model.family!r}"
      )
    return Task(
      "seq2seq", "lm", SEQ2SEQ_BATCH_AXES, functools.partial(seq2seq_loss, z_weight=t.z_loss)
    )
  raise ValueError(f"unknown train.task={name!r}; known: {sorted(TASKS)}")


TASKS = ("lm", "mlm", "classify", "seq2seq")
