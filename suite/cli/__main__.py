"""python -m suite.cli: the gistress command."""

import sys

from suite.cli.main import main

sys.exit(main())
