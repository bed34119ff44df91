"""also_fused: ALSO, group weights, RGD and Adam/AdamW with fused Triton kernels and a pure-torch reference path."""
from . import amp
from .adam import Adam, AdamW
from .also import ALSO
from .functional import FLOAT32_EPS
from .group_weights import GroupWeights
from .in_backward import StepInBackward
from .rgd import rgd_loss
from .sampler import PiBatchSampler

__version__ = "0.1.0"
__all__ = ["ALSO", "GroupWeights", "Adam", "AdamW", "rgd_loss", "PiBatchSampler", "StepInBackward", "FLOAT32_EPS", "amp",
           "__version__"]
