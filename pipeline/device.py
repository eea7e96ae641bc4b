"""The torch device a stage runs on, from a setting: ``auto`` | ``cpu`` | ``cuda[:N]``."""

from __future__ import annotations

import torch


def resolve_device(device: str) -> torch.device:
    """``auto`` picks a GPU when torch sees one; asking for CUDA without one is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"--device {device} was requested but torch sees no CUDA device; "
                           f"use --device cpu or auto")
    return torch.device(device)
