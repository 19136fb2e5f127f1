"""Kernel tests run on CUDA when present, else under Triton's CPU interpreter.

TRITON_INTERPRET must be set before triton decorates any kernel, so before kestrel.kernels is
imported; pytest imports this conftest before the test modules of this folder.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
