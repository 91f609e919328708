"""`python -m inference_stage2`: the same as `stage2-refine`."""
import sys

from .cli import main

sys.exit(main())
