"""Train-step throughput benchmark: ``python -m experiments.benchmark`` = ``llm-mp bench``.

The code lives in :mod:`llm_mp.benchmark` (so the installed ``llm-mp bench``
works from any directory); see its docstring for what is measured.

  python -m experiments.benchmark --preset nanogpt_cpu --precision fp32
  python -m experiments.benchmark --suite gpu
"""

from llm_mp.benchmark import main

if __name__ == "__main__":
  raise SystemExit(main())
