"""offload_checkpoint: gradients equal plain checkpointing and no checkpointing; host buffers pooled.

CPU tests run twice where it matters: with the default offloader (CPU tensors are left in place, so
only the recompute is exercised) and with ``offload_cpu_tensors=True``, which sends CPU tensors
through the whole pack / pool / prefetch / unpack path (streams and events are the only CUDA-only part).
GPU tests (marked gpu) check the same parity on the device, that saved inputs really leave device
memory, and that 100 steps of varying length grow neither the host pool nor device memory.
"""

import copy
import random
import warnings

import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

import fastkern
from fastkern.offload import ActivationOffloader, HostBufferPool, offload_checkpoint


class Block(nn.Module):
    def __init__(self, width: int, p: float):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 2 * width)
        self.drop = nn.Dropout(p)
        self.down = nn.Linear(2 * width, width)

    def forward(self, x, scale=1.0):
        return x + scale * self.down(self.drop(torch.nn.functional.gelu(self.up(self.norm(x)))))


class Stack(nn.Module):
    def __init__(self, width=24, depth=4, p=0.0, mode="none", offloader=None):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, p) for _ in range(depth))
        self.mode, self.offloader = mode, offloader

    def forward(self, x):
        for block in self.blocks:
            if self.mode == "plain":
                x = checkpoint(block, x, 0.5, use_reentrant=False)
            elif self.mode == "offload":
                x = offload_checkpoint(block, x, 0.5, offloader=self.offloader)
            else:
                x = block(x, 0.5)
        return x


def _models(p, device="cpu", dtype=torch.float32, offloader=None, width=24, depth=4):
    torch.manual_seed(0)
    base = Stack(width, depth, p).to(device, dtype)
    out = {}
    for mode in ("none", "plain", "offload"):
        m = copy.deepcopy(base)
        m.mode = mode
        m.offloader = offloader
        out[mode] = m
    return out


def _train(model, batches, accumulate_then_backward=False, autocast_dtype=None):
    """Gradient accumulation over ``batches``; returns (losses, input grads, parameter grads)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)  # dropout masks come from this stream in every variant
    losses, inputs, pending = [], [], []
    for x in batches:
        x = x.clone().requires_grad_(True)
        inputs.append(x)
        ctx = torch.autocast(x.device.type, dtype=autocast_dtype) if autocast_dtype else _null()
        with ctx:
            loss = model(x).float().square().mean()
        losses.append(loss.detach())
        if accumulate_then_backward:
            pending.append(loss)
        else:
            loss.backward()
    if pending:
        torch.stack(pending).sum().backward()
    return losses, [x.grad for x in inputs], [p.grad.clone() for p in model.parameters()]


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _assert_same(a, b):
    for x, y in zip(a, b, strict=True):
        if isinstance(x, list):
            _assert_same(x, y)
        else:
            torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("offload_cpu", [False, True])
@pytest.mark.parametrize("together", [False, True])
def test_gradients_match_plain_and_no_checkpointing(p, offload_cpu, together):
    offloader = ActivationOffloader(min_bytes=0, offload_cpu_tensors=offload_cpu)
    models = _models(p, offloader=offloader)
    batches = [torch.randn(3, 7, 24), torch.randn(2, 11, 24), torch.randn(3, 7, 24)]
    ref = _train(models["none"], batches, together)
    plain = _train(models["plain"], batches, together)
    got = _train(models["offload"], batches, together)
    _assert_same(got, plain)
    _assert_same(got, ref)
    if p > 0:  # dropout really is on: a different seed gives different gradients
        models["none"].zero_grad()
        torch.manual_seed(999)
        other = [t for t in torch.autograd.grad(models["none"](batches[0]).square().mean(), models["none"].parameters())]
        assert not all(torch.equal(a, b) for a, b in zip(other, ref[2]))
    stats = offloader.stats
    assert stats.calls == 4 * len(batches)
    if offload_cpu:
        assert stats.offloaded == 4 * len(batches) and stats.bytes_offloaded > 0
        # In backward every input but the first one needed was copied back ahead of time; with one
        # backward over all micro-batches, prefetching carries on from one micro-batch into the previous.
        on_demand = 1 if together else len(batches)
        assert (stats.fetched_on_demand, stats.prefetched) == (on_demand, 4 * len(batches) - on_demand)
    else:
        assert stats.offloaded == 0 and stats.kept >= 4 * len(batches)
    assert offloader.live_tensors == 0


def test_autocast_bf16_matches_plain():
    offloader = ActivationOffloader(min_bytes=0, offload_cpu_tensors=True)
    models = _models(0.2, offloader=offloader)
    batches = [torch.randn(2, 9, 24)]
    plain = _train(models["plain"], batches, autocast_dtype=torch.bfloat16)
    got = _train(models["offload"], batches, autocast_dtype=torch.bfloat16)
    _assert_same(got, plain)
    assert offloader.stats.offloaded == 4


def test_no_grad_outside_and_inside():
    offloader = ActivationOffloader(min_bytes=0, offload_cpu_tensors=True)
    block = Block(16, 0.0)
    x = torch.randn(2, 5, 16, requires_grad=True)
    with torch.no_grad():
        y = offload_checkpoint(block, x, offloader=offloader)
    assert y.grad_fn is None and offloader.stats.offloaded == 0 and offloader.live_tensors == 0
    torch.testing.assert_close(y, block(x), rtol=0, atol=0)

    def partly_frozen(h):
        with torch.no_grad():
            shift = block.up(h).mean()  # constant for autograd
        return block(h) * 2 + shift

    g_ref = torch.autograd.grad(partly_frozen(x).sum(), [x, *block.parameters()])
    g = torch.autograd.grad(offload_checkpoint(partly_frozen, x, offloader=offloader).sum(), [x, *block.parameters()])
    _assert_same(list(g), list(g_ref))
    assert offloader.stats.offloaded == 1


def test_inputs_not_requiring_grad_and_non_tensor_args():
    offloader = ActivationOffloader(min_bytes=0, offload_cpu_tensors=True)
    block = Block(16, 0.0)
    x = torch.randn(4, 16)  # no grad: still saved and needed by the recompute
    fn = lambda h, k, *, bias: block(h, scale=k) + bias  # noqa: E731
    ref = torch.autograd.grad(fn(x, 0.25, bias=1.0).sum(), list(block.parameters()))
    out = offload_checkpoint(fn, x, 0.25, offloader=offloader, bias=1.0)
    got = torch.autograd.grad(out.sum(), list(block.parameters()))
    _assert_same(list(got), list(ref))


@pytest.mark.parametrize("layout", ["transposed", "strided_slice", "expanded"])
def test_non_contiguous_inputs(layout):
    offloader = ActivationOffloader(min_bytes=0, offload_cpu_tensors=True)
    base = torch.randn(6, 8, 16)
    x = {"transposed": base.transpose(0, 1), "strided_slice": base[:, ::2], "expanded": base[:1].expand(6, 8, 16)}[layout]
    x = x.detach().requires_grad_(True) if layout != "expanded" else x
    seen = []

    def fn(h):
        seen.append(h.stride())
        return (h.sin() * h).sum(dim=-1)

    out = offload_checkpoint(fn, x, offloader=offloader)
    ref_out = (x.sin() * x).sum(dim=-1)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    if x.requires_grad:
        (g,) = torch.autograd.grad(out.sum(), [x])
        (g_ref,) = torch.autograd.grad(ref_out.sum(), [x])
        torch.testing.assert_close(g, g_ref, rtol=0, atol=0)
        if layout == "transposed":  # dense layouts come back with their strides
            assert seen[-1] == x.stride()


def test_retain_graph_backward_twice():
    offloader = ActivationOffloader(min_bytes=0, offload_cpu_tensors=True)
    models = _models(0.3, offloader=offloader)
    x = torch.randn(2, 5, 24)
    torch.manual_seed(5)
    loss = models["offload"](x).square().mean()
    g1 = torch.autograd.grad(loss, list(models["offload"].parameters()), retain_graph=True)
    g2 = torch.autograd.grad(loss, list(models["offload"].parameters()))
    _assert_same(list(g1), list(g2))
    del loss
    assert offloader.live_tensors == 0


def test_pool_reused_across_steps_and_bounded_with_varying_lengths():
    offloader = ActivationOffloader(min_bytes=0, offload_cpu_tensors=True)
    model = _models(0.0, offloader=offloader, width=32, depth=5)["offload"]
    lengths = [64] + [random.Random(i).randint(8, 64) for i in range(30)]  # the largest first
    held = []
    for t in lengths:
        model(torch.randn(2, t, 32)).square().mean().backward()
        assert offloader.live_tensors == 0
        held.append((offloader.pool.bytes_held, offloader.pool.buffers_held, offloader.pool.allocations))
    assert held[0][1] == 5  # one buffer per layer alive at once
    assert all(h == held[0] for h in held), held  # nothing allocated after the largest step
    offloader.empty_cache()
    assert offloader.pool.bytes_held == 0 and offloader.pool.buffers_held == 0


def test_graph_dropped_without_backward_returns_buffers():
    offloader = ActivationOffloader(min_bytes=0, offload_cpu_tensors=True)
    model = _models(0.0, offloader=offloader)["offload"]
    out = model(torch.randn(2, 5, 24))
    assert offloader.live_tensors == 4
    del out
    assert offloader.live_tensors == 0
    assert len(offloader.pool._free) == offloader.pool.buffers_held == 4


def test_in_place_change_after_call_is_an_error():
    offloader = ActivationOffloader(min_bytes=0, offload_cpu_tensors=True)
    x = torch.randn(8, 8, requires_grad=True)
    h = x * 1.0
    out = offload_checkpoint(lambda t: t.sin(), h, offloader=offloader)
    with torch.no_grad():
        h.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        out.sum().backward()


def test_small_tensors_parameters_and_argument_errors():
    offloader = ActivationOffloader(min_bytes=4096, offload_cpu_tensors=True)
    small = torch.randn(4, 4, requires_grad=True)
    weight = nn.Parameter(torch.randn(4, 4))
    offload_checkpoint(lambda a, w: a @ w, small, weight, offloader=offloader).sum().backward()
    assert offloader.stats.offloaded == 0 and offloader.stats.kept == 2
    with pytest.raises(ValueError, match="use_reentrant"):
        offload_checkpoint(torch.sin, small, use_reentrant=True, offloader=offloader)
    with pytest.raises(ValueError, match="min_bytes"):
        ActivationOffloader(min_bytes=-1)


def test_checkpoint_kwargs_pass_through():
    offloader = ActivationOffloader(min_bytes=0, offload_cpu_tensors=True)
    x = torch.randn(5, 5, requires_grad=True)
    out = offload_checkpoint(torch.sin, x, offloader=offloader, preserve_rng_state=False, determinism_check="none")
    (g,) = torch.autograd.grad(out.sum(), [x])
    torch.testing.assert_close(g, x.cos(), rtol=0, atol=0)


def test_pinned_memory_failure_falls_back_with_warning(monkeypatch):
    real_empty = torch.empty

    def no_pinning(*args, pin_memory=False, **kwargs):
        if pin_memory:
            raise RuntimeError("pinned allocation failed (simulated)")
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", no_pinning)
    pool = HostBufferPool(pin_memory=True)
    with pytest.warns(RuntimeWarning, match="pageable"):
        buf = pool.acquire(1000, pinned=True)
    assert buf is not None and buf.capacity >= 1000 and not buf.data.is_pinned()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, not per buffer
        assert pool.acquire(5000, pinned=True) is not None


def test_no_host_memory_keeps_tensor_in_place(monkeypatch):
    offloader = ActivationOffloader(min_bytes=0, offload_cpu_tensors=True)
    monkeypatch.setattr(offloader.pool, "_allocate", lambda capacity, pinned: None)
    x = torch.randn(6, 6, requires_grad=True)
    (g,) = torch.autograd.grad(offload_checkpoint(torch.sin, x, offloader=offloader).sum(), [x])
    torch.testing.assert_close(g, x.cos(), rtol=0, atol=0)
    assert offloader.stats.offloaded == 0 and offloader.stats.kept == 1


def test_deepcopy_gets_a_fresh_offloader_and_default_is_exported():
    offloader = ActivationOffloader(min_bytes=123, offload_cpu_tensors=True)
    offloader.pool.acquire(10, pinned=False)
    clone = copy.deepcopy(offloader)
    assert clone is not offloader and clone.min_bytes == 123 and clone.pool.bytes_held == 0
    assert fastkern.offload_checkpoint is offload_checkpoint
    x = torch.randn(3, requires_grad=True)  # default offloader, CPU tensor: recompute only
    (g,) = torch.autograd.grad(fastkern.offload_checkpoint(torch.exp, x).sum(), [x])
    torch.testing.assert_close(g, x.exp(), rtol=0, atol=0)


def test_compiled_function_inside_fullgraph():
    """A layer compiled with fullgraph=True runs under offload_checkpoint (hooks stay outside the graph);
    aot_eager keeps CI free of a C++ toolchain while still tracing forward and backward graphs."""
    offloader = ActivationOffloader(min_bytes=0, offload_cpu_tensors=True)
    torch.manual_seed(0)
    block = Block(24, 0.2)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 5, 24, requires_grad=True)
    torch.manual_seed(1)
    out = offload_checkpoint(compiled, x, offloader=offloader)
    got = torch.autograd.grad(out.square().sum(), [x, *block.parameters()])
    torch.manual_seed(1)
    ref = torch.autograd.grad(checkpoint(compiled, x, use_reentrant=False).square().sum(), [x, *block.parameters()])
    _assert_same(list(got), list(ref))
    assert offloader.stats.offloaded == 1


class _FakeEvent:
    def __init__(self, n):
        self.n = n


class _FakeStream:
    """Records the stream protocol instead of running it (CPU stand-in for torch.cuda.Stream)."""

    def __init__(self, name, log):
        self.name, self.log = name, log

    def wait_stream(self, other):
        self.log.append((self.name, "wait_stream", other.name))

    def wait_event(self, event):
        self.log.append((self.name, "wait_event", event.n))

    def record_event(self):
        event = _FakeEvent(sum(1 for entry in self.log if entry[1] == "record"))
        self.log.append((self.name, "record", event.n))
        return event


@pytest.fixture
def fake_streams(monkeypatch):
    """Run the CUDA branch of the offloader on CPU tensors with recording streams and events."""
    import contextlib

    import fastkern.offload.offloader as module

    log = []
    compute = _FakeStream("compute", log)
    monkeypatch.setattr(module, "_streamed", lambda device: True)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: compute)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: _FakeStream("side", log))
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.Tensor, "record_stream", lambda self, stream: log.append((stream.name, "record_stream")),
                        raising=False)
    return log


def test_stream_protocol(fake_streams):
    """Copies out: side waits for compute, copies, records; compute waits on the copy when the call returns
    (stream-ordered release, no record_stream). Backward: the first copy back is on demand, each unpack
    waits on its own copy back and starts the previous item's; nothing needs record_stream."""
    log = fake_streams
    offloader = ActivationOffloader(min_bytes=0, pin_memory=False)
    models = _models(0.0, offloader=offloader, depth=3)
    model, x = models["offload"], torch.randn(2, 5, 24)
    out = model(x)
    forward = list(log)
    per_call = [("side", "wait_stream"), ("side", "record"), ("compute", "wait_event")]
    assert [e[:2] for e in forward] == per_call * 3
    d2h = [e[2] for e in forward if e[1] == "record"]
    assert [e[2] for e in forward if e[0] == "compute"] == d2h  # each call waits on its own copy out
    log.clear()
    out.square().mean().backward()
    waits = [e[2] for e in log if e[:2] == ("compute", "wait_event")]
    side_waits = [e[2] for e in log if e[:2] == ("side", "wait_event")]
    h2d = [e[2] for e in log if e[1] == "record"]
    assert len(h2d) == 3 and waits == h2d  # every copy back waited on by compute before use, in order
    assert side_waits == d2h[::-1]  # each copy back ordered after that buffer's copy out
    assert not any(e[1] == "record_stream" for e in log)
    assert (offloader.stats.prefetched, offloader.stats.fetched_on_demand) == (2, 1)
    assert offloader.live_tensors == 0
    models["plain"](x).square().mean().backward()
    for a, b in zip(model.parameters(), models["plain"].parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


def test_unused_prefetch_is_protected_by_record_stream(fake_streams):
    log = fake_streams
    offloader = ActivationOffloader(min_bytes=0, pin_memory=False)
    block = Block(24, 0.0)
    x = torch.randn(3, 24, requires_grad=True)
    first = offload_checkpoint(block, x, offloader=offloader)  # its graph will be dropped
    second = offload_checkpoint(block, torch.randn(3, 24, requires_grad=True), offloader=offloader)
    second.sum().backward()  # unpacking `second` prefetches `first`'s input
    assert offloader.stats.prefetched == 0 and offloader.stats.fetched_on_demand == 1
    assert not any(e[1] == "record_stream" for e in log)
    del first  # the prefetched copy was never consumed: its memory must wait for the side stream
    assert log[-1] == ("side", "record_stream") and offloader.live_tensors == 0


# ---------------------------------------------------------------------------------------------- GPU

gpu = pytest.mark.gpu


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_gpu_parity(dtype, p):
    offloader = ActivationOffloader()
    models = _models(p, device="cuda", dtype=dtype, offloader=offloader, width=512, depth=4)
    batches = [torch.randn(2, 1024, 512, device="cuda", dtype=dtype) for _ in range(3)]
    for together in (False, True):
        ref = _train(models["none"], batches, together)
        plain = _train(models["plain"], batches, together)
        got = _train(models["offload"], batches, together)
        _assert_same(got, plain)  # same kernels, same RNG, exact copies: bit-identical
        for a, b in zip(got[2], ref[2]):
            torch.testing.assert_close(a, b)
    assert offloader.stats.offloaded == 4 * 3 * 2 and offloader.live_tensors == 0
    # Reused across steps: 4 buffers while one micro-batch is alive at a time, 12 once three forwards
    # precede one backward.
    assert offloader.pool.allocations == 12 and offloader.pool.buffers_held == 12


@gpu
def test_gpu_autocast_and_side_compute_stream():
    offloader = ActivationOffloader()
    models = _models(0.2, device="cuda", offloader=offloader, width=512, depth=4)
    batches = [torch.randn(2, 1024, 512, device="cuda")]
    plain = _train(models["plain"], batches, autocast_dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # the current stream at call time is the one to order against
        got = _train(models["offload"], batches, autocast_dtype=torch.bfloat16)
    torch.cuda.current_stream().wait_stream(stream)
    _assert_same(got, plain)
    assert offloader.stats.offloaded == 4


def _settled_allocated() -> int:
    torch.cuda.synchronize()
    torch.empty(1, device="cuda")  # lets the allocator process the frees that waited on side-stream events
    return torch.cuda.memory_allocated()


@gpu
def test_gpu_saved_inputs_leave_the_device():
    width, tokens, depth = 2048, 8192, 8
    layer_bytes = tokens * width * 2
    results = {}
    for mode in ("plain", "offload"):
        torch.manual_seed(0)
        layers = [nn.Linear(width, width, bias=False, device="cuda", dtype=torch.bfloat16) for _ in range(depth)]
        offloader = ActivationOffloader()
        x = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        before = _settled_allocated()
        h = x
        for layer in layers:
            fn = lambda t, layer=layer: torch.nn.functional.silu(layer(t))  # noqa: E731
            h = checkpoint(fn, h, use_reentrant=False) if mode == "plain" else offload_checkpoint(fn, h, offloader=offloader)
        loss = h.float().square().mean()
        results[mode] = _settled_allocated() - before
        loss.backward()
        grads = [layer.weight.grad.float() for layer in layers]
        results[mode + "_grads"] = grads
        del loss, h
    saved = results["plain"] - results["offload"]
    assert saved >= (depth - 2) * layer_bytes, (results["plain"], results["offload"], layer_bytes)
    for a, b in zip(results["plain_grads"], results["offload_grads"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@gpu
def test_gpu_stress_varying_lengths_no_memory_growth():
    width, depth = 1024, 8
    offloader = ActivationOffloader()
    torch.manual_seed(0)
    model = Stack(width, depth, 0.1, mode="offload", offloader=offloader).to("cuda", torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    rng = random.Random(0)
    lengths = [4096] + [rng.randint(256, 4096) for _ in range(99)]
    history = []
    for step, t in enumerate(lengths):
        x = torch.randn(2, t, width, device="cuda", dtype=torch.bfloat16)
        loss = model(x).float().square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        del loss, x
        assert torch.isfinite(next(model.parameters())).all()
        if step == 1 or step == len(lengths) - 1:
            history.append((offloader.pool.bytes_held, offloader.pool.buffers_held, offloader.pool.allocations,
                            _settled_allocated()))
        assert offloader.live_tensors == 0
    assert history[0] == history[-1], history
    assert offloader.stats.offloaded == depth * len(lengths)
    assert offloader.stats.prefetched >= (depth - 1) * len(lengths)


@gpu
def test_gpu_peak_lower_while_the_cpu_runs_ahead():
    """Peak memory measured without synchronizing: the CPU queues layers faster than the GPU runs them,
    so device memory of offloaded inputs must be reusable in stream order (not only once an event is
    seen complete), or the loss-time allocation lands on top of inputs whose copies have not run yet."""
    width, tokens, depth = 4096, 8192, 12
    layer_bytes = tokens * width * 2
    peaks = {}
    for mode in ("plain", "offload"):
        torch.manual_seed(0)
        weights = [torch.randn(width, width, device="cuda", dtype=torch.bfloat16) / width**0.5 for _ in range(depth)]
        x = torch.randn(tokens, width, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        offloader = ActivationOffloader()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        h = x
        for w in weights:
            fn = lambda t, w=w: torch.tanh(t @ w) @ w  # noqa: E731
            h = checkpoint(fn, h, use_reentrant=False) if mode == "plain" else offload_checkpoint(fn, h, offloader=offloader)
        logits = torch.empty(4 * layer_bytes, dtype=torch.uint8, device="cuda")  # stands for the loss's buffers
        peaks[mode] = torch.cuda.max_memory_allocated() - base
        h.float().mean().backward()
        del logits, h
        torch.cuda.synchronize()
    assert peaks["plain"] - peaks["offload"] >= (depth - 2) * layer_bytes, (peaks, layer_bytes)


# ------------------------------------------------------------------------------- host memory budget


@pytest.fixture
def available(monkeypatch):
    """Fake MemAvailable (bytes) for the budget and the per-allocation check; set ``available.bytes``.
    The budget reads it in offloader.py, the per-allocation check in pool.py: both are faked."""
    import fastkern.offload.offloader
    import fastkern.offload.pool

    class Available:
        bytes = 64 << 30

    for module in (fastkern.offload.offloader, fastkern.offload.pool):
        monkeypatch.setattr(module, "_available_host_bytes", lambda: Available.bytes)
    return Available


def test_budget_caps_the_pool_and_the_rest_stays_in_place(available):
    # Each layer input here is 2*5*24*4 = 960 bytes, held in a 64 KiB (minimum granule) pageable buffer:
    # a budget of two buffers offloads two of the four inputs per step and keeps the other two.
    offloader = ActivationOffloader(min_bytes=0, offload_cpu_tensors=True, host_bytes=2 * 65536)
    models = _models(0.3, offloader=offloader)
    batches = [torch.randn(2, 5, 24)]
    plain = _train(models["plain"], batches)
    with pytest.warns(RuntimeWarning, match="host budget of 0.00 GiB is reached"):
        got = _train(models["offload"], batches)
    _assert_same(got, plain)
    stats = offloader.stats
    assert (stats.offloaded, stats.kept_on_device, stats.bytes_kept_on_device) == (2, 2, 2 * 960)
    assert offloader.pool.bytes_held == offloader.pool.peak_bytes_held == 2 * 65536
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per offloader, not per step
        for _ in range(3):
            _assert_same(_train(models["offload"], batches), plain)
    assert offloader.pool.allocations == 2  # buffers reused across steps, none allocated after the first
    assert (stats.offloaded, stats.kept_on_device) == (8, 8) and offloader.live_tensors == 0


def test_default_budget_is_a_fraction_of_available_ram(available):
    available.bytes = 8 << 30
    assert ActivationOffloader().host_budget() == 4 << 30  # DEFAULT_HOST_FRACTION = 0.5
    quarter = ActivationOffloader(host_fraction=0.25)
    available.bytes = 16 << 30  # read once, on first need: later changes do not move the budget
    assert quarter.host_budget() == 4 << 30
    available.bytes = 1 << 40
    assert quarter.host_budget() == 4 << 30
    assert ActivationOffloader(host_bytes=123).host_budget() == 123  # explicit: RAM not consulted


def test_unreadable_available_ram_keeps_everything_on_the_device(available):
    available.bytes = None
    offloader = ActivationOffloader(min_bytes=0, offload_cpu_tensors=True)
    models = _models(0.0, offloader=offloader)
    x = torch.randn(2, 5, 24)
    with pytest.warns(RuntimeWarning, match="available RAM cannot be read"):
        got = _train(models["offload"], [x])
    _assert_same(got, _train(models["plain"], [x]))
    assert offloader.host_budget() == 0 and offloader.stats.offloaded == 0 and offloader.stats.kept_on_device == 4


def test_new_buffer_refused_when_ram_available_now_is_low(available):
    """A budget read earlier does not force an allocation the host can no longer give: a new buffer must
    leave HOST_RESERVE_BYTES available (a pageable one may shrink to the exact size to fit)."""
    from fastkern.offload import HOST_RESERVE_BYTES

    pool = HostBufferPool(pin_memory=False, max_bytes=1 << 40)
    available.bytes = HOST_RESERVE_BYTES + 65535  # a 64 KiB buffer does not fit, 960 bytes do
    assert pool.acquire(960, pinned=False).capacity == 960
    available.bytes = HOST_RESERVE_BYTES + 100
    assert pool.acquire_or_reason(960, pinned=False) == (None, "budget")
    offloader = ActivationOffloader(min_bytes=0, offload_cpu_tensors=True, host_bytes=1 << 40)
    x = torch.randn(2, 5, 24, requires_grad=True)
    with pytest.warns(RuntimeWarning, match="host budget"):
        (g,) = torch.autograd.grad(offload_checkpoint(torch.sin, x, offloader=offloader).sum(), [x])
    torch.testing.assert_close(g, x.cos(), rtol=0, atol=0)
    assert offloader.stats.offloaded == 0 and offloader.stats.bytes_kept_on_device == 960


def test_pinned_buffers_are_counted_at_their_power_of_two_size(monkeypatch, available):
    """PyTorch's pinned allocator rounds every request up to a power of two: the pool asks for that size
    and counts it against the budget (fake pinned allocator: no CUDA here)."""
    real_empty = torch.empty
    sizes = []

    def fake_pinned(*args, pin_memory=False, **kwargs):
        if pin_memory:
            sizes.append(args[0])
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", fake_pinned)
    pool = HostBufferPool(pin_memory=True, max_bytes=6 << 20)
    first = pool.acquire(3 * 2**20 + 1, pinned=True)
    assert sizes == [4 << 20] and first.capacity == 4 << 20 and pool.bytes_held == 4 << 20
    assert pool.acquire_or_reason(3 * 2**20, pinned=True) == (None, "budget")  # 4 + 4 MiB > 6 MiB
    second = pool.acquire(2 << 20, pinned=True)  # 4 + 2 MiB: fits exactly
    assert second.capacity == 2 << 20 and pool.bytes_held == 6 << 20 and sizes == [4 << 20, 2 << 20]
    pool.release(first)
    assert pool.acquire(3 << 20, pinned=True) is first  # reused, nothing allocated
    assert pool.allocations == 2
    import fastkern.offload.pool as module

    released = []
    monkeypatch.setattr(module, "_release_cached_pinned", lambda: released.append(pool.bytes_held))
    pool.release(first)
    pool.release(second)
    assert pool.acquire(5 << 20, pinned=True) is None  # both too small: dropped, 8 MiB over the budget
    assert pool.bytes_held == 0 and released == [0]  # dropped pinned memory handed back to the OS


def test_budget_argument_errors():
    for bad in (-1, 1.5, True, "1G"):
        with pytest.raises(ValueError, match="host_bytes must be None or an int"):
            ActivationOffloader(host_bytes=bad)
    for bad in (0, -0.5, 1.5, "0.5", None):
        with pytest.raises(ValueError, match="host_fraction must be a number in"):
            ActivationOffloader(host_fraction=bad)
    clone = copy.deepcopy(ActivationOffloader(host_bytes=5 << 20, host_fraction=0.3))
    assert (clone.host_bytes, clone.host_fraction) == (5 << 20, 0.3)


def test_recompute_starts_the_copies_before_the_function_runs():
    """ActivationOffloader.recompute (the reentrant checkpoint): each tensor argument is packed once, before
    the function is queued (so its copy overlaps the function's kernels), and that copy is what autograd
    saves; the rerun in backward packs nothing. Gradients equal the plain computation's."""
    offloader = ActivationOffloader(min_bytes=0, offload_cpu_tensors=True)
    events = []
    pack = offloader._pack
    offloader._pack = lambda copied, t: events.append("pack") or pack(copied, t)
    x = torch.randn(8, 8, requires_grad=True)
    w = torch.randn(8, 8, requires_grad=True)

    def fn(a):
        events.append("run")
        return (a @ w).sin()

    out = offloader.recompute(fn, x)
    assert events == ["pack", "run"]
    out.square().sum().backward()
    assert events == ["pack", "run", "run"]
    assert offloader.stats.calls == 1 and offloader.stats.offloaded == 1 and offloader.live_tensors == 0
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    (x @ w).sin().square().sum().backward()
    torch.testing.assert_close(gx, x.grad, rtol=0, atol=0)
    torch.testing.assert_close(gw, w.grad, rtol=0, atol=0)
