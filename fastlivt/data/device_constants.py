"""Small constant tensors of the device pipeline, made once per device and kept: building them per batch from host
lists would copy from pageable memory, which waits for the device's queued work (a host-device sync per batch)."""
from __future__ import annotations

import functools
from typing import Tuple

import torch


@functools.lru_cache(maxsize=None)
def constant(values: Tuple[float, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.tensor(values, dtype)`` on ``device``, the same tensor for every call (read it, never write it)."""
    return torch.tensor(values, dtype=dtype).to(device)
