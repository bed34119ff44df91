"""kernels.launch (direct relaunch of compiled Triton kernels) and kernels.staging (pinned upload ring)."""
from __future__ import annotations

import pytest
import torch

from conftest import DEVICE, triton_importable

pytestmark = pytest.mark.skipif(not triton_importable(), reason="triton is not installed")

if triton_importable():
    import triton
    import triton.language as tl

    @triton.jit
    def _axpb_kernel(x_ptr, y_ptr, a, n, b, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask) * a + b, mask=mask)


def test_launcher_follows_alignment_and_integer_specialisation():
    from also_fused.kernels.launch import Launcher

    launch = Launcher(_axpb_kernel, dict(BLOCK=64), dict(num_warps=1))
    # aligned, then views at odd offsets (not 16-byte aligned), then n = 1 and multiples of 16, and back;
    # the element type changes between calls too
    cases = [(0, 200, 3), (1, 150, 5), (3, 16, 1), (0, 1, 7), (2, 33, 16), (0, 200, -2), (1, 150, 0)]
    for dtype in (torch.float32, torch.float16, torch.float64, torch.float32):
        base = torch.arange(300, dtype=dtype, device=DEVICE)
        for offset, n, b in cases * 2:
            x = base[offset:offset + n]
            y = torch.zeros(n + 5, dtype=dtype, device=DEVICE)
            launch(triton.cdiv(n, 64), x.device, x, y, 0.5, n, b)
            torch.testing.assert_close(y[:n], x * 0.5 + b, rtol=0, atol=0)
            assert torch.count_nonzero(y[n:]) == 0


def test_pinned_uploads_arrive_in_order():
    from also_fused.kernels.staging import PinnedUploader

    uploads = PinnedUploader()
    out = torch.empty(3, dtype=torch.int64, device=DEVICE)
    seen = torch.empty(70, 3, dtype=torch.int64, device=DEVICE)
    streams = [None]
    if DEVICE == "cuda":
        streams.append(torch.cuda.Stream())
    for stream in streams:
        ctx = torch.cuda.stream(stream) if stream is not None else torch.autocast("cpu", enabled=False)
        with ctx:
            for k in range(70):  # several laps of the ring, each slot reused while earlier copies may be queued
                uploads.upload((k, 2 * k, -k), out)
                seen[k].copy_(out)
        if stream is not None:
            torch.cuda.current_stream().wait_stream(stream)
        k = torch.arange(70, device=DEVICE)
        assert torch.equal(seen, torch.stack([k, 2 * k, -k], 1))


def test_pinned_upload_rounds_float64_to_nearest_float32():
    from also_fused.kernels.staging import PinnedUploader

    values = [[0.1, 1 / 3, 1e-8], [0.999, 2.0 ** -30 + 1.0, 7.0]]
    out = torch.empty(2, 3, dtype=torch.float32, device=DEVICE)
    PinnedUploader().upload(values, out)
    assert torch.equal(out.cpu(), torch.tensor(values, dtype=torch.float64).float())
