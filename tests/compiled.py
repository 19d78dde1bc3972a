"""A flax module's ``init`` and ``apply`` as one compiled program each, for the tests'
forward passes and references.

Outside ``jax.jit`` a module runs op by op, and every new (op, shapes, dtypes) is
compiled on its own: one forward pass of a tiny model is a hundred or more small
compilations, most of a model test's time. Here the whole call is compiled once and
cached by the module's value (flax modules hash and compare by their fields), so the
tests that build equal models share one program. The arithmetic is the model's; only
XLA's fusion of it may differ from the op-by-op run, within fp32 rounding.
"""

from __future__ import annotations

import functools

import jax


@functools.partial(jax.jit, static_argnums=0)
def init(model, rng, *args, **kwargs):
  """``model.init(rng, *args, **kwargs)``: the variables (boxed as the model makes them)."""
  return model.init(rng, *args, **kwargs)


@functools.cache
def _compiled_apply(model, method, mutable, capture_intermediates, deterministic):
  options = {} if deterministic is None else {"deterministic": deterministic}

  def run(variables, *args, **kwargs):
    return model.apply(
      variables,
      *args,
      method=method,
      mutable=mutable,
      capture_intermediates=capture_intermediates,
      **options,
      **kwargs,
    )

  return jax.jit(run)


def apply(
  model,
  variables,
  *args,
  method=None,
  mutable=False,
  capture_intermediates=False,
  deterministic=None,
  **kwargs,
):
  """``model.apply(variables, *args, **kwargs)``. ``method``, ``mutable`` (a tuple of
  collection names, not a list), ``capture_intermediates`` and ``deterministic`` (passed
  on unless None) are fixed in the program; ``args`` and ``kwargs`` are its inputs
  (arrays or pytrees of them: ``rngs``, segment ids, positions)."""
  run = _compiled_apply(model, method, mutable, capture_intermediates, deterministic)
  return run(variables, *args, **kwargs)
