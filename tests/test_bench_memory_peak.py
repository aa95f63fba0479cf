"""bench/memory_peak.py's replay, on a synthetic allocator trace (the recording itself needs CUDA)."""

from bench.memory_peak import peak_report


def _alloc(addr, size, where):
    return dict(action="alloc", addr=addr, size=size,
                frames=[dict(filename="/x/torch/nn/functional.py", line=1, name="linear"),
                        dict(filename=f"/work/main/fastkern/{where}.py", line=7, name=where)])


def test_peak_report_groups_what_is_alive_at_the_peak_by_first_non_torch_frame():
    mib = 2**20
    events = [
        _alloc(1, 10 * mib, "a"),
        _alloc(2, 30 * mib, "b"),
        dict(action="free_completed", addr=2, size=30 * mib),
        _alloc(3, 5 * mib, "a"),   # peak is earlier (40 MiB), when 1 and 2 were alive
        _alloc(4, 20 * mib, "c"),  # 35 MiB: below the peak
    ]
    text = peak_report(events)
    assert text.splitlines()[0].startswith("peak within the block: 40.0 MiB in 2 allocations")
    assert "30.0 MiB  x1    fastkern/b.py:7 b" in text
    assert "10.0 MiB  x1    fastkern/a.py:7 a" in text
    assert "c.py" not in text


def test_sites_skip_cpp_frames_and_name_the_autograd_node_when_no_python_frame_exists():
    cpp = dict(filename="??", line=0, name="torch::unwind::unwind()")
    node = dict(filename="??", line=0, name="torch::autograd::generated::MmBackward0::apply(...)")
    mib = 2**20
    events = [
        dict(action="alloc", addr=1, size=3 * mib,
             frames=[cpp, dict(filename="/x/site-packages/peft/tuners/lora/layer.py", line=9, name="forward")]),
        dict(action="alloc", addr=2, size=2 * mib, frames=[cpp, node]),
        dict(action="alloc", addr=3, size=1 * mib, frames=[cpp]),
    ]
    text = peak_report(events)
    assert "3.0 MiB  x1    peft/tuners/lora/layer.py:9 forward" in text
    assert "2.0 MiB  x1    (autograd engine: MmBackward0)" in text
    assert "1.0 MiB  x1    (torch internals)" in text
    assert "unwind" not in text
