"""kernels.launch (direct relaunch of compiled Triton kernels) and kernels.staging (pinned upload ring)."""
from __future__ import annotations

import pytest
import torch

from support import DEVICE, triton_importable

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


def test_kept_launch_follows_each_varying_argument():
    """launch_cached keeps the launch of the last key and rewrites only the varying arguments (x, y, b); a
    varying argument whose specialisation changes (element type, alignment, integer class) is launched
    through the Launcher instead and becomes the kept launch. Every call is checked against torch."""
    from also_fused.kernels.launch import launch_cached

    cache: dict = {}
    n = 150
    base = {dtype: torch.arange(300, dtype=dtype, device=DEVICE) for dtype in (torch.float32, torch.float16)}
    cases = [(torch.float32, 0, 3), (torch.float32, 4, 5), (torch.float32, 1, 6), (torch.float32, 1, 1),
             (torch.float32, 0, 16), (torch.float16, 0, 2), (torch.float16, 8, 7), (torch.float32, 0, -3)]
    kept = []
    for dtype, offset, b in cases * 2:
        x = base[dtype][offset:offset + n]
        y = torch.zeros(n + 5, dtype=dtype, device=DEVICE)
        launch_cached(cache, (n, 0.5), _axpb_kernel, triton.cdiv(n, 64), x.device, (x, y, 0.5, n, b), (0, 1, 4),
                      num_warps=1, BLOCK=64)
        torch.testing.assert_close(y[:n], x * 0.5 + b, rtol=0, atol=0)
        assert torch.count_nonzero(y[n:]) == 0
        kept.append(next(iter(cache.values()), None))
    if DEVICE == "cuda":
        assert all(k is not None for k in kept)
        # the same specialisation twice in a row keeps the launch; a new one replaces it
        # (aligned views and b of one integer class share one; misalignment, b = 1, b % 16 == 0 and the
        # element type each need another)
        assert kept[1] is kept[0] and kept[6] is kept[5]
        assert all(kept[i] is not kept[i - 1] for i in (2, 3, 4, 5, 7))
    else:
        assert kept == [None] * len(kept)  # the interpreter: always Triton's own path


@pytest.mark.skipif(DEVICE != "cuda", reason="kept launches exist on CUDA only")
def test_kept_launch_steps_aside_for_launch_hooks():
    """With a Triton launch hook installed, a kept launch launches nothing and the Launcher (Triton's own
    path, which calls the hook) runs it."""
    from triton import knobs

    from also_fused.kernels.launch import launch_cached

    cache: dict = {}
    x = torch.arange(64, dtype=torch.float32, device=DEVICE)
    y = torch.zeros(64, dtype=torch.float32, device=DEVICE)
    args = (x, y, 2.0, 64, 1)
    launch_cached(cache, (), _axpb_kernel, 1, x.device, args, (0, 1), num_warps=1, BLOCK=64)
    calls = []

    def hook(metadata):
        calls.append(metadata)

    knobs.runtime.launch_enter_hook.add(hook)
    try:
        y.zero_()
        launch_cached(cache, (), _axpb_kernel, 1, x.device, args, (0, 1), num_warps=1, BLOCK=64)
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    assert calls and torch.equal(y, x * 2 + 1)


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


def _changed_positions(before, after) -> list:
    """The positions at which two launches' arguments differ: a tensor by its address, shape and dtype (what a
    kept launch holds of it), anything else by type and value."""
    def same(a, b) -> bool:
        if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
            return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.data_ptr() == b.data_ptr()
                    and a.shape == b.shape and a.dtype == b.dtype)
        return type(a) is type(b) and a == b

    return [i for i, (a, b) in enumerate(zip(before, after)) if not same(a, b)]


def _kept_launch_contract(monkeypatch) -> dict:
    """Wraps launch_cached where the pi step and the weighted loss call it: a repeat of a (cache, key) may change
    only the arguments its ``varying`` names (a kept launch on a GPU rewrites only those; any other that changed
    would be launched with its old value). Returns the number of repeats checked per kernel."""
    from also_fused.kernels import group_pi, launch, losses

    seen: dict = {}
    checked: dict = {}
    caches = []  # every cache stays alive: a freed one's id could name another

    def checking(cache, key, kernel, grid, device, args, varying, num_warps=4, **constexprs):
        if cache is not None:
            caches.append(cache)
            first = seen.get((id(cache), key))
            if first is None:
                seen[id(cache), key] = (kernel, grid, num_warps, constexprs, tuple(args))
            else:
                name = kernel.fn.__name__ if hasattr(kernel, "fn") else str(kernel)
                assert first[:4] == (kernel, grid, num_warps, constexprs), name
                changed = _changed_positions(first[4], args)
                assert set(changed) <= set(varying), (name, changed, varying)
                checked[name] = checked.get(name, 0) + 1
        launch.launch_cached(cache, key, kernel, grid, device, args, varying, num_warps=num_warps, **constexprs)

    monkeypatch.setattr(group_pi, "launch_cached", checking)
    monkeypatch.setattr(losses, "launch_cached", checking)
    return checked


@pytest.mark.parametrize("n_groups,batch", [(6, 8), (2000, 4), (5000, 4)])
@pytest.mark.parametrize("mode", ["descent-ascent", "optimistic"])
@pytest.mark.parametrize("validate", [True, False])
def test_every_kept_launch_names_what_changes(monkeypatch, n_groups: int, batch: int, mode: str,
                                              validate: bool) -> None:
    """GroupWeights' loop over new batches (new tensors every iteration, all kept alive so that none reuses an
    address), one and two micro-batches per step: the staged single program (6 groups), the single program of
    several micro-batches, the many-groups path's dense (2000 groups) and sparse (5000) variants and the weights
    of the weighted loss, with and without the device checks (their error word and report slots are arguments);
    every repeat of a kept launch changes only its varying arguments."""
    import also_fused

    checked = _kept_launch_contract(monkeypatch)
    weights = also_fused.GroupWeights(n_groups, batch_size=batch, mode=mode, pi_lr=0.05, pi_decay=0.1,
                                      backend="triton", device=DEVICE, validate=validate)
    gen = torch.Generator().manual_seed(n_groups)
    alive = []
    for step in range(6):
        for _ in range(1 if step < 3 else 2):  # three steps of one micro-batch, three of two
            ids = torch.randint(0, n_groups, (batch,), generator=gen).to(DEVICE)
            losses = (torch.rand(batch, generator=gen) * 2).to(DEVICE).requires_grad_()
            weights.weighted_loss(losses, ids).backward()
            alive.append((ids, losses))
        alive.append(weights.step())
    kernels = set(checked)
    if n_groups <= 1024:
        # on a GPU the staged step replays its kept launch itself (not through launch_cached, for its host time),
        # so there only its first launch is seen; its arguments are built by the same code on every device
        staged_repeats = set() if DEVICE == "cuda" else {"_weighted_pi_kernel"}
        assert staged_repeats | {"_pi_small_kernel"} <= kernels, checked
    else:
        assert {"_sample_weights_kernel", "_pi_sample_sums_kernel", "_pi_stats_kernel", "_pi_write_kernel"} <= kernels, checked


def _kept_theta_launch_contract(monkeypatch) -> dict:
    """multi_tensor_adam keeps one prepared launch per (tables, flags, scales) and on a GPU rewrites only the
    arguments of ``_VARYING[n_lr]`` when it repeats one; here every launch passes through a ``Launcher`` made by
    the module (nothing is prepared, on any device), so a repeat of the same (launcher, scales) may change only
    those. Returns the number of repeats checked per n_lr."""
    from also_fused.kernels import multi_tensor_adam as M

    first: dict = {}
    checked: dict = {}
    launchers = []  # every launcher stays alive: a freed one's id could name another

    class Checking(M.Launcher):
        def __call__(self, grid: int, device: torch.device, *args) -> None:
            if self not in launchers:
                launchers.append(self)
            n_lr = self.constexprs["N_LR_ARGS"]
            scales = args[6:9]  # grad, extrapolation and prior scales: part of the kept launch's key
            seen = first.get((id(self), scales))
            if seen is None:
                first[id(self), scales] = (grid, args)
            else:
                changed = _changed_positions(seen[1], args)
                assert seen[0] == grid and set(changed) <= set(M._VARYING[n_lr]), (n_lr, changed, M._VARYING[n_lr])
                checked[n_lr] = checked.get(n_lr, 0) + 1
            super().__call__(grid, device, *args)

        def prepare(self, device, args, varying):
            return None  # on a GPU too, every launch then passes through __call__ (and is checked)

    monkeypatch.setattr(M, "Launcher", Checking)
    return checked


@pytest.mark.parametrize("case", ["adamw-schedule", "adam-scaler", "also-optimistic", "also-int8"])
def test_every_kept_theta_launch_names_what_changes(monkeypatch, case: str) -> None:
    """Training loops over fresh gradients every step (``zero_grad`` frees them): AdamW with an lr schedule
    (the lr arguments change), Adam under GradScaler (its scale and found-inf tensors), ALSO in optimistic mode
    and in descent-ascent with 8-bit moments (the device checks' report slot changes every step); every repeat
    of a kept theta launch changes only its varying arguments. Dropping any name from ``_VARYING`` fails this
    test or the next one."""
    import also_fused

    checked = _kept_theta_launch_contract(monkeypatch)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)).to(DEVICE)
    scaler = None
    if case == "adamw-schedule":
        opt = also_fused.AdamW(model.parameters(), lr=1e-2, backend="triton")
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (1 + k))
    elif case == "adam-scaler":
        opt = also_fused.Adam(model.parameters(), lr=1e-2, backend="triton")
        scaler = torch.amp.GradScaler(DEVICE, init_scale=2.0 ** 8, growth_interval=1)
    else:
        opt = also_fused.ALSO(model.parameters(), n_groups=5, batch_size=4, lr=1e-2, backend="triton",
                              mode="optimistic" if case == "also-optimistic" else "descent-ascent",
                              state_precision="int8" if case == "also-int8" else "param")
    gen = torch.Generator().manual_seed(1)
    for step in range(5):
        x = torch.randn(4, 8, generator=gen).to(DEVICE)
        y = torch.randint(0, 3, (4,), generator=gen).to(DEVICE)
        losses = torch.nn.functional.cross_entropy(model(x), y, reduction="none")
        if case.startswith("also"):
            loss = opt.weighted_loss(losses, torch.randint(0, 5, (4,), generator=gen).to(DEVICE))
        else:
            loss = losses.mean()
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        opt.zero_grad()
        if case == "adamw-schedule":
            schedule.step()
    assert sum(checked.values()) >= 3, checked


def test_kept_theta_launch_follows_a_new_error_word_and_grad_table(monkeypatch) -> None:
    """The arguments no training loop above changes off CUDA: the error word (any call may pass another with
    the same tables) and the grad table, which is reallocated when a step runs on another stream (simulated
    here by the stream handle the kernel module reads). Repeats of one kept launch with each changed pass the
    contract, and the update stays the kernel's: the same params as an uncached call."""
    from also_fused.kernels import multi_tensor_adam as M

    checked = _kept_theta_launch_contract(monkeypatch)
    gen = torch.Generator().manual_seed(2)
    shapes = [(5,), (3, 4)]

    def state():
        params = [torch.randn(s, generator=gen).to(DEVICE) for s in shapes]
        zeros = [[torch.zeros(s, device=DEVICE) for s in shapes] for _ in range(2)]
        return params, zeros[0], zeros[1], [torch.zeros((), device=DEVICE) for _ in shapes]

    kept, fresh = state(), state()
    for a, b in zip(kept[0], fresh[0]):
        b.copy_(a)
    hyper = M.hyper_table([(1e-2, 0.9, 0.999, 1e-8, 0.0)], DEVICE)
    streams = iter(range(100, 200))
    monkeypatch.setattr(M, "raw_stream", lambda device: next(streams))
    cache: dict = {}
    for step in range(4):
        grads = [torch.randn(s, generator=gen).to(DEVICE) for s in shapes]
        word = torch.zeros((), dtype=torch.int32, device=DEVICE)  # a new error word every call
        params, m, v, steps = kept
        M.multi_tensor_adam_(params, grads, m, v, steps, params, hyper, [0, 0], cache=cache, error_word=word)
        params, m, v, steps = fresh
        M.multi_tensor_adam_(params, grads, m, v, steps, params, hyper, [0, 0])
    assert checked.get(0, 0) >= 3, checked
    for a, b in zip(kept[0], fresh[0]):
        assert torch.equal(a, b)
