import os

# Under pytest-xdist each worker gets its share of the cores: n workers each running torch's and the C++
# extension's OpenMP threads on every core oversubscribe the machine, and spinning OpenMP threads then
# make some CPU tests 20-50x slower. Set before the extension's OpenMP runtime starts.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))

import torch  # noqa: E402

if _WORKERS > 1:
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

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
