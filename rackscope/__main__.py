"""``python -m rackscope``."""

import sys

from rackscope.cli import main

sys.exit(main())
