"""``python -m skmm_pipeline.cli``."""

import sys

from skmm_pipeline.cli import main

sys.exit(main())
