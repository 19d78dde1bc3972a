"""What every task shares: the batch layout, the bound :class:`Task`, running a
model and gathering what its modules recorded, and the fp32 cross-entropy.

A task's loss function has the signature

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
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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
  """A task bound to one run: its registry entry's static facts and a loss
  function with the run's options (z-loss weight, MLM mask ids) filled in.

  Attributes:
    name: the ``train.task`` value.
    head: the model head the loss reads ("lm": per-token vocabulary logits,
      "classify": one row of class logits per sequence, "span": start/end logits).
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


def apply_to_tokens(model, variables, batch: Batch, rng, inputs=None):
  """:func:`apply_model` on a token batch: ``inputs`` (default ``batch["inputs"]``)
  ``[B, T]`` with the batch's optional ``segment_ids`` and ``positions``."""
  return apply_model(
    model,
    variables,
    batch["inputs"] if inputs is None else inputs,
    segment_ids=batch.get("segment_ids"),
    positions=batch.get("positions"),
    rng=rng,
  )


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


def token_loss(logits, targets, mask, aux_loss, metrics, model_state, z_weight):
  """Mean token cross-entropy (+ z-loss + recorded losses) and its aux dict."""
  nll, z, count = cross_entropy(logits, targets, mask)
  n = jnp.maximum(count, 1.0)
  loss = nll / n
  aux = {**metrics, "weight": count, "loss": loss, "model_state": model_state}
  return loss + z_weight * z / n + aux_loss, aux


def random_tokens(rows: int, length: int, vocab: int, seed: int = 0) -> np.ndarray:
  """int64 ``[rows, length]`` token ids uniform in ``[0, vocab)``, numpy seed ``seed``."""
  return np.random.default_rng(seed).integers(0, vocab, (rows, length))


def packed_rows(tokens: np.ndarray) -> Batch:
  """int32 ``inputs, segment_ids, positions [B, T]`` of one document per row of
  ``tokens [B, T]``."""
  batch, seq = tokens.shape
  return {
    "inputs": jnp.asarray(tokens, jnp.int32),
    "segment_ids": jnp.ones((batch, seq), jnp.int32),
    "positions": jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq)),
  }


def token_batch(config: Any, batch_size: int) -> Batch:
  """A language-model batch of random tokens (numpy seed 0, one document per row):
  int32 ``inputs, targets, segment_ids, positions [batch_size, data.seq_len]``,
  ``targets`` the inputs shifted left."""
  tokens = random_tokens(batch_size, config.data.seq_len + 1, config.model.vocab_size)
  return {**packed_rows(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:], jnp.int32)}


@dataclasses.dataclass(frozen=True)
class TaskData:
  """How a task reads, splits, tokenises and batches its data.

  Attributes:
    prepare: ``(config, workdir, tokenizer, write) -> prepared``: the run's data
      (reads ``config.data``; ``tokenizer`` None trains one, or reads the workdir's);
      ``prepared`` has ``tokenizer``, ``sha256`` (the content hash a resumed run
      checks) and a one-line ``str()`` for the log. ``write=False`` writes nothing.
    train_batches: ``(prepared, config) -> iterator`` of NumPy batches, endless
      and resumable (``get_state`` / ``set_state``), ``train.batch_size`` rows.
    eval_batches: ``(prepared, config, max_batches, split) -> iterable`` of
      batches of ``split`` ("val", or "train" for files given to evaluate);
      ``max_batches`` None: the whole split.
    check: ``(config, prepared) -> bool``: raises ValueError naming the field for
      data that cannot train (checked before step 1); returns whether there is
      validation data to evaluate on.
    on_files: ``(config, paths) -> (config, split)``: the config and split that
      evaluate the files ``paths`` instead of the run's validation data.
  """

  prepare: Callable[..., Any]
  train_batches: Callable[..., Any]
  eval_batches: Callable[..., Any]
  check: Callable[..., bool]
  on_files: Callable[..., tuple[Any, str]]


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """A registry entry: everything about one task (``llm_mp.tasks.register_task``).

  Attributes:
    name: the ``train.task`` value.
    families: the model families it trains (``model.family`` values).
    default_for: the families whose ``train.task="auto"`` means this task.
    head: the model head its loss reads.
    batch_axes: logical axes of each batch key.
    make_loss: ``(config, tokenizer) -> loss_fn`` (module docstring): binds the
      run's options; raises ValueError when it needs what it lacks.
    data: how its data is prepared and batched (:class:`TaskData`).
    predict: ``(run, texts, **options) -> list[str]``: the text-level prediction
      of a loaded run (``llm_mp.rundir.LoadedRun``) for each input text: a
      continuation, a label, an output text.
    unit: what its loss averages over ("tokens" or "examples").
    perplexity: whether ``exp(loss)`` is reported.
    continues_prompt: whether the model continues a text prompt (the training
      loop then shows ``train.sample_prompt``'s continuation at evaluations).
    synthetic_batch: ``(config, batch_size) -> batch``: random data with every key
      of ``batch_axes`` (NumPy seed 0), what ``llm-mp bench`` times the step on.
    frozen: None, or ``(config, load_run, tokenizer) -> {collection: value}``:
      read-only inputs of the loss that are not training state (``distill``'s
      teacher). The training loop calls it once with ``load_run(workdir)`` (a
      run directory loaded onto this run's mesh, laid out by its rules) and the
      run's tokenizer; the step passes the result as a jit argument and adds it
      to the loss's ``variables``; nothing in it is differentiated, updated or
      checkpointed.
  """

  name: str
  families: tuple[str, ...]
  head: str
  batch_axes: Mapping[str, tuple[str | None, ...]]
  make_loss: Callable[[Any, Any], LossFn]
  data: TaskData
  predict: Callable[..., list[str]]
  default_for: tuple[str, ...] = ()
  unit: str = "tokens"
  perplexity: bool = True
  continues_prompt: bool = False
  synthetic_batch: Callable[[Any, int], Batch] = token_batch
  frozen: Callable[..., dict[str, Any]] | None = None
