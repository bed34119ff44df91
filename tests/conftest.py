import os

import torch

# Without a GPU the Triton kernels run on CPU tensors through Triton's interpreter; the variable must
# be set before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# the shared helpers live in support/; DEVICE and SHORT are re-exported here
from support import DEVICE, SHORT  # noqa: E402,F401


@pytest.fixture
def device() -> str:
    return DEVICE
