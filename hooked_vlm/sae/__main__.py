"""``python -m hooked_vlm.sae harvest|train-sae ...``: the ``hooked-vlm`` entry point under another name
(:func:`hooked_vlm.cli.main` parses every command; :mod:`hooked_vlm.sae.cli` registers these)."""

import sys

from hooked_vlm.cli import main

sys.exit(main(prog="python -m hooked_vlm.sae"))
