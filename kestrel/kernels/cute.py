"""Optional CuTe DSL kernels (FlashAttention 4, quack): used on Hopper where the package is
installed and not turned off, each only where it was measured faster than what it replaces."""

from __future__ import annotations

import importlib
import os

import torch


def hopper_kernel(device: torch.device, env: str, module: str, name: str):
    """``module.name`` on a Hopper (SM90) GPU where ``module`` imports and the environment
    variable ``env`` is not 0; None elsewhere (CPU, other GPUs, not installed)."""
    if (device.type != "cuda" or os.environ.get(env, "1") == "0"
            or torch.cuda.get_device_capability(device)[0] != 9):
        return None
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError:
        return None
