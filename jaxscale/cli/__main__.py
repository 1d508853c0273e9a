"""`python -m jaxscale.cli ...`: what the `jaxscale` script runs (child processes are started this way)."""
import sys

from jaxscale.cli import main

sys.exit(main())
