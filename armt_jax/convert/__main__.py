"""`python -m armt_jax.convert --from hf --to orbax IN OUT` (same as `armt convert`)."""

import sys

from armt_jax.convert.cli import convert_main

sys.exit(convert_main())
