"""What every launch into flexkern._C needs: the device guard, the stream handle, raw pointers."""
from __future__ import annotations

import contextlib

import torch


def device_and_stream(t: torch.Tensor):
    """(context manager that makes t's device current, t's device's current stream handle)."""
    guard = torch.cuda.device(t.device) if t.device.index != torch.cuda.current_device() \
        else contextlib.nullcontext()
    return guard, torch.cuda.current_stream(t.device).cuda_stream


def ptr(t: torch.Tensor | None) -> int:
    """Device address of a contiguous tensor; 0 for None (a null pointer in csrc/)."""
    return 0 if t is None else t.data_ptr()
