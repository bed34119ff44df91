"""also_fused: ALSO, RGD and Adam/AdamW with fused Triton kernels and a pure-torch reference path."""
from .adam import Adam, AdamW
from .also import ALSO
from .functional import FLOAT32_EPS
from .rgd import rgd_loss
from .sampler import PiBatchSampler

__version__ = "0.1.0"
__all__ = ["ALSO", "Adam", "AdamW", "rgd_loss", "PiBatchSampler", "FLOAT32_EPS", "__version__"]
