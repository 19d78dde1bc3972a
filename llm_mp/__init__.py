"""llm_mp: Transformer language models in JAX/Flax with explicit mixed precision."""
