"""`python -m megapix.plan`: the same as `megapix plan`."""
import sys

from megapix.plan.cli import main

sys.exit(main())
