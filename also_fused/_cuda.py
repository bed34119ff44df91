"""The current CUDA stream at a low host cost (imports only torch)."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

# the raw id of the current stream of a device index, cheaply (Triton reads it the same way); torch's
# public call otherwise
raw_stream_of_index = getattr(torch._C, "_cuda_getCurrentRawStream", None) or (
    lambda index: torch.cuda.current_stream(index).cuda_stream)
# the current CUDA device's index, without torch.cuda.current_device()'s Python wrapper
current_device_index = getattr(torch._C, "_cuda_getDevice", None) or torch.cuda.current_device

# per device index: (raw id, stream object) of the last current stream seen; a cache of torch's answer
_last_streams: Dict[int, Tuple[int, "torch.cuda.Stream"]] = {}


def device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def raw_stream(device: torch.device) -> Optional[int]:
    """The handle of the current CUDA stream of ``device`` (None for a device that is not CUDA)."""
    return raw_stream_of_index(device_index(device)) if device.type == "cuda" else None


def current_stream(device: torch.device) -> "torch.cuda.Stream":
    """torch.cuda.current_stream(device), without its per-call cost while the current stream is unchanged."""
    index = device_index(device)
    raw = raw_stream_of_index(index)
    last = _last_streams.get(index)
    if last is None or last[0] != raw:
        last = _last_streams[index] = (raw, torch.cuda.current_stream(index))
    return last[1]
