"""DTensor (FSDP2) params and state: the update of a sharded param is the update of its local shard."""
from __future__ import annotations

from typing import Callable

from torch import Tensor

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch build without torch.distributed
    DTensor = None


def is_dtensor(t: Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local_tensor(t: Tensor) -> Tensor:
    """The shard this rank holds of a DTensor (FSDP2 params, grads and state), else ``t`` itself.

    The shard shares storage with the DTensor, so updating it in place updates the DTensor."""
    return t._local_tensor if is_dtensor(t) else t


def on_shard(fn: Callable[[Tensor], Tensor], value: Tensor) -> Tensor:
    """``fn`` of a plain tensor, or of a DTensor's local shard wrapped back into a DTensor laid out alike."""
    if not is_dtensor(value):
        return fn(value)
    return DTensor.from_local(fn(value.to_local()), value.device_mesh, value.placements, run_check=False,
                              shape=value.shape, stride=value.stride())
