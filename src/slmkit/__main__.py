"""`python -m slmkit ...` is `slm ...` (torchrun launches modules: torchrun -m slmkit train ...)."""

import sys

from .cli import main

sys.exit(main())
