"""``python -m hooked_vlm.sae harvest|train-sae ...`` (see :mod:`hooked_vlm.sae.cli`)."""

import sys

from hooked_vlm.sae.cli import main

sys.exit(main())
