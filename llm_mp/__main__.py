import sys

from llm_mp.cli import main

sys.exit(main())
