"""``python -m model.bootstrap OUTPUT_DIR [--tiny]``."""

import sys

from model.bootstrap.build import main

sys.exit(main())
