import sys

from megapix.cli import main

sys.exit(main())
