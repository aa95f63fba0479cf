"""bench/host_ops.py and bench/host_time.py on a tiny model: the counters see the step's host work and attribute it per
layer; the CPU proxy times steps with the launches stubbed."""

import pytest
import torch

from fastkern import runtime

pytest.importorskip("transformers")
pytest.importorskip("peft")


def _host_ops():
    from bench import host_ops

    return host_ops


def _host_time():
    from bench import host_time

    return host_time


@pytest.mark.skipif(runtime.path_for(torch.empty(0)) != "interpreter", reason="needs TRITON_INTERPRET=1")
def test_counts_per_layer_full_finetune(tmp_path):
    result = _host_ops().main(["--modes", "full", "--layers", "1,2", "--out", str(tmp_path), "--top", "50"])
    rows = {row["variant"]: row for row in result["rows"]}
    assert set(rows) == {"unpatched", "fastkern"}
    plain, patched = rows["unpatched"]["per_layer"], rows["fastkern"]["per_layer"]
    # Unpatched runs no fastkern kernel; patched runs its kernels in forward, recompute and backward.
    assert plain["total"]["launches"] == 0
    assert patched["forward"]["launches"] > 0 and patched["backward"]["launches"] > patched["forward"]["launches"]
    for per_layer in (plain, patched):
        for metric in ("aten", "py", "c"):
            assert per_layer["forward"][metric] > 0 and per_layer["backward"][metric] > 0, metric
    # Work inside a launch is the interpreter's, not the host's on a GPU: none of it is counted, so no
    # interpreter frame shows among the Python calls.
    names = [name for name, _ in rows["fastkern"]["top"]["py"]]
    assert not any("triton/runtime/interpreter" in name for name in names)
    # Nor does the bench's own bookkeeping of a launch (the wrapper, the launch counter).
    assert not any(name.startswith("host_ops.py:") for name in names)
    # The fused kernels replace transformers' elementwise RMSNorm / SwiGLU / rope ops.
    assert patched["total"]["aten"] < plain["total"]["aten"]
    assert (tmp_path / "host_ops.json").exists() and "| full | fastkern |" in (tmp_path / "host_ops.md").read_text()


@pytest.mark.skipif(runtime.path_for(torch.empty(0)) != "interpreter", reason="needs TRITON_INTERPRET=1")
def test_time_steps_stubs_launches_and_restores_them():
    host_ops = _host_ops()
    runs = [(cls, cls.run) for cls in host_ops._kernel_classes()]
    threads = torch.get_num_threads()
    ms = _host_time().time_steps("full", True, layers=1, steps=1, warmup=1)
    assert ms > 0
    assert [(cls, cls.run) for cls, _ in runs] == runs and torch.get_num_threads() == threads


@pytest.mark.skipif(runtime.path_for(torch.empty(0)) != "interpreter", reason="needs TRITON_INTERPRET=1")
def test_time_steps_times_a_fully_patched_model(monkeypatch):
    # The probes of patch_model run the kernels: patching after the launches are stubbed would fail them
    # and time a model with mlp / norm / rope skipped.
    import fastkern

    reports = []
    patch = fastkern.patch_model
    monkeypatch.setattr(fastkern, "patch_model", lambda model, **kw: reports.append(patch(model, **kw)) or reports[-1])
    _host_time().time_steps("lora", True, layers=1, steps=1, warmup=0)
    assert len(reports) == 1 and not reports[0].skipped, reports[0]
    assert {"mlp", "norm", "rope", "lora"} <= {e.kind for e in reports[0].patched}


@pytest.mark.skipif(runtime.path_for(torch.empty(0)) != "interpreter", reason="needs TRITON_INTERPRET=1")
def test_time_grouping_times_both_settings_and_restores_the_switch(monkeypatch):
    from fastkern.patching import lora

    groups = {True: 0, False: 0}
    real = lora.lora_linear_group

    def spy(x, calls):
        groups[lora.GROUP_PROJECTIONS] += 1
        return real(x, calls)

    monkeypatch.setattr(lora, "lora_linear_group", spy)
    timed = _host_time().time_switch("grouping", "lora", layers=1, steps=1, rounds=2, warmup=0)
    assert set(timed) == {"grouped", "separate"}
    assert all(len(t["round_medians_ms"]) == 2 and t["median_ms"] > 0 for t in timed.values())
    # grouped rounds went through the group op, separate ones never did; the switch is back on
    assert groups[True] > 0 and groups[False] == 0 and lora.GROUP_PROJECTIONS is True


@pytest.mark.skipif(runtime.path_for(torch.empty(0)) != "interpreter", reason="needs TRITON_INTERPRET=1")
def test_time_adapter_casts_times_both_dtypes():
    timed = _host_time().time_adapter_casts(layers=1, steps=1, rounds=1, warmup=0)
    assert set(timed) == {"fp32 adapters", "bf16 adapters"}
    assert all(len(t["round_medians_ms"]) == 1 and t["median_ms"] > 0 for t in timed.values())


@pytest.mark.skipif(runtime.path_for(torch.empty(0)) != "interpreter", reason="needs TRITON_INTERPRET=1")
def test_time_qk_fusion_times_both_settings_and_restores_the_switch(monkeypatch):
    from fastkern.patching import attention

    calls = {True: 0, False: 0}
    real = attention.rope_qk_norm

    def spy(*args, **kwargs):
        calls[attention.FUSE_QK_NORM] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(attention, "rope_qk_norm", spy)
    default = attention.FUSE_QK_NORM, attention.FUSE_QK_NORM_TRAINABLE
    timed = _host_time().time_switch("qk_fusion", "full", layers=1, steps=1, rounds=2, warmup=0)
    assert set(timed) == {"fused", "separate"}
    assert all(len(t["round_medians_ms"]) == 2 and t["median_ms"] > 0 for t in timed.values())
    # only the fused rounds called the fused op (a Qwen3 model was built; its norm weights train in this
    # mode); the switches are back as they were
    assert calls[True] > 0 and calls[False] == 0
    assert (attention.FUSE_QK_NORM, attention.FUSE_QK_NORM_TRAINABLE) == default
