"""``python -m grassopt.train`` (and ``torchrun --nproc_per_node=N -m grassopt.train``)."""

import sys

from .cli import main

sys.exit(main())
