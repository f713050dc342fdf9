"""`python -m instructloop.cli`: the same command as `instructloop`."""

import sys

from instructloop.cli import main

sys.exit(main())
