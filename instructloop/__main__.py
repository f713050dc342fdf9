import sys

from instructloop.cli import main

sys.exit(main())
