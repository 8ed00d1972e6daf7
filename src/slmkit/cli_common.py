"""What every `slm` subcommand's parsing shares."""

from __future__ import annotations

import torch

from .errors import require


def set_threads(args) -> None:
    if args.threads is not None:
        require(0 < args.threads <= 4096, f"--threads must be between 1 and 4096, got {args.threads}")
        torch.set_num_threads(args.threads)
