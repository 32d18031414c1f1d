"""`python -m bench`: the same as `python -m bench.run` (what `make bench` runs)."""

import sys

from bench.run import main

sys.exit(main())
