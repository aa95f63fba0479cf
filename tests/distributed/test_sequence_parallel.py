"""Sequence parallelism (fastkern.parallel, Ulysses all-to-all) on CPU: 2 processes, gloo.

Both ranks run every scenario of tests/distributed/_sp_worker.py in one spawn; the single-process references
run here. What is checked:

* all_to_all: forward against an all-gather of the inputs; backward against central differences of a
  float64 objective of both ranks' inputs (each entry of each rank perturbed in turn), through
  all_to_all_single and through the send/recv fallback, both dim orders.
* shard_sequence: contiguous shards, global positions, the padding rule, labels shifted over the whole row.
* A tiny Llama sharded over the 2 ranks (odd length: one padded token) on a packed row of 3 documents (one
  crossing the shard boundary) and on 2 plain causal rows (rank 1 holding no target of one row; then none),
  unpatched and under fastkern.patch_model defaults, under eager, with gradient checkpointing, and with 1
  kv head for 2 ranks (repeated): loss and every parameter gradient on each rank equal one process
  running the whole batch.
* Clear errors (heads not divisible, enabled twice, no position_ids, padding mask, implementation changed
  underneath), undo, a group of one rank.

Tolerance: fp32, rtol 1e-4 / atol 1e-6, as tests/distributed/test_ddp_fsdp.py. The all-to-alls move values
exactly; what differs from one process is summation order (each rank's weight gradient sums over its own
tokens, then the two partial sums are added; attention runs per document instead of under a masked [T, T]
SDPA; the loss is summed per shard). Measured: relative differences ~1e-6.
"""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from fastkern.parallel import kv_repeat_factor
from tests.distributed import _sp_worker

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

TOL = dict(rtol=1e-4, atol=1e-6)
ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(out_dir, backend: str) -> list[dict]:
    import torch.multiprocessing as mp

    mp.spawn(_sp_worker.main, args=(_free_port(), str(out_dir), list(_sp_worker.SCENARIOS), backend),
             nprocs=_sp_worker.WORLD, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(_sp_worker.WORLD)]


def _references(device: torch.device) -> dict:
    previous, _sp_worker.DEVICE = _sp_worker.DEVICE, device
    try:
        return {case: _sp_worker.reference(case) for case in _sp_worker.CASES}
    finally:
        _sp_worker.DEVICE = previous


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return _spawn(tmp_path_factory.mktemp("sp_ranks"), "gloo")


@pytest.fixture(scope="module")
def references():
    return _references(torch.device("cpu"))


def check_all_to_all(ranks, method):
    for rank in range(_sp_worker.WORLD):
        for (m, scatter_dim, gather_dim), got in ranks[rank]["all_to_all"].items():
            if m != method:
                continue
            what = f"rank {rank}, {method}, scatter {scatter_dim} gather {gather_dim}"
            assert got["forward_error"] == 0.0, what  # a permutation: exact
            # float64 central differences with eps 1e-6: truncation ~eps^2, rounding ~1e-16 / eps = 1e-10
            assert got["grad_error"] <= 1e-7 * max(1.0, got["grad_scale"]), (what, got)


def check_shard_sequence(ranks):
    ids, labels, position_ids = (t.cpu() for t in _sp_worker.data("packed"))
    length = _sp_worker.LENGTH  # 23 -> padded to 24: one pad token at the end
    shards = [ranks[r]["shard"] for r in range(_sp_worker.WORLD)]
    assert [(s["start"], s["stop"], s["padding"]) for s in shards] == [(0, 12, 1), (12, 24, 1)]
    full = {name: torch.cat([s[name] for s in shards], dim=1) for name in
            ("input_ids", "position_ids", "labels", "shift_labels")}
    assert torch.equal(full["input_ids"][:, :length], ids) and full["input_ids"][0, length] == 0
    # global positions; the pad continues the last document (position 5 -> 6): no new document
    assert torch.equal(full["position_ids"][:, :length], position_ids) and full["position_ids"][0, length] == 6
    assert torch.equal(full["labels"][:, :length], labels) and full["labels"][0, length] == -100
    # position t's target is the label of t + 1 over the whole row, across the shard boundary
    assert torch.equal(full["shift_labels"][:, :length - 1], labels[:, 1:])
    assert (full["shift_labels"][:, length - 1:] == -100).all()
    assert sum(s["token_count"] for s in shards) == int((labels[:, 1:] != -100).sum())


def check_sharded_step(ranks, references, case):
    want = references[case]
    for rank in range(_sp_worker.WORLD):
        got = ranks[rank]["models"][case]
        torch.testing.assert_close(got["loss"], want["loss"], **TOL)
        assert got["grads"].keys() == want["grads"].keys(), case
        for name, grad in want["grads"].items():
            torch.testing.assert_close(got["grads"][name], grad, **TOL,
                                       msg=lambda m: f"{case}, rank {rank}, {name}: {m}")
        if _sp_worker.CASES[case][1].get("patched"):
            assert got["logits_none"], f"{case}: fastkern's fused loss did not run"
    if case == "kv_repeat":
        assert "repeated x2" in ranks[0]["models"][case]["report"]
    if case == "causal":  # rank 1's shard of row 1 has no target; the counts differ, the loss is still global
        assert [ranks[r]["models"][case]["token_count"] for r in range(2)] == [20, 10]
    if case == "no_targets_on_rank_1":  # its summed loss is 0 with a graph: its backward (collective) still runs
        assert [ranks[r]["models"][case]["token_count"] for r in range(2)] == [17, 0]


def test_kv_repeat_factor():
    assert kv_repeat_factor(4, 2, 2) == 1
    assert kv_repeat_factor(4, 1, 2) == 2
    assert kv_repeat_factor(8, 2, 4) == 2  # 2 kv heads over 4 ranks: 4 after repeating each twice
    assert kv_repeat_factor(32, 8, 8) == 1
    with pytest.raises(ValueError, match="do not split over 2 ranks"):
        kv_repeat_factor(3, 1, 2)
    with pytest.raises(ValueError, match="not a multiple"):
        kv_repeat_factor(4, 3, 2)


def check_errors_undo_and_single_rank_group(ranks):
    for rank in range(_sp_worker.WORLD):
        errors = ranks[rank]["errors"]
        assert errors["heads"].startswith("ValueError") and "divisible by the group size" in errors["heads"]
        assert "already enabled" in errors["twice"]
        assert errors["no_position_ids"].startswith("ValueError") and "position_ids" in errors["no_position_ids"]
        assert errors["padding_mask"].startswith("ValueError") and "padding" in errors["padding_mask"]
        assert errors["ones_mask_same"]
        assert errors["implementation_changed"].startswith("RuntimeError")
        assert errors["undo_restores"] and errors["undo_unregisters"]
        single = ranks[rank]["single_rank_group"]
        assert not single["active"] and "nothing to do" in single["report"] and single["implementation"] == "sdpa"


@pytest.mark.parametrize("method", ["all_to_all_single", "send_recv"])
def test_all_to_all_forward_and_gradient(ranks, method):
    check_all_to_all(ranks, method)


def test_shard_sequence_layout_and_padding(ranks):
    check_shard_sequence(ranks)


@pytest.mark.parametrize("case", list(_sp_worker.CASES))
def test_sharded_step_equals_one_process(ranks, references, case):
    check_sharded_step(ranks, references, case)


def test_errors_undo_and_single_rank_group(ranks):
    check_errors_undo_and_single_rank_group(ranks)


@pytest.mark.slow
def test_bench_tiny_run_under_torchrun(tmp_path):
    """bench/e2e/sequence_parallel.py --tiny: 2 CPU ranks under torchrun, PEFT LoRA on the patched model with
    gradient checkpointing; the first step's loss equals one unsharded process's, one schema row written."""
    pytest.importorskip("peft")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
           str(_free_port()), "-m", "bench.e2e.sequence_parallel", "--tiny", "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (path,) = tmp_path.glob("sequence_parallel-*.json")
    (row,) = json.loads(path.read_text())["rows"]
    extra = row["extra"]
    assert (row["op"], row["impl"], extra["world"]) == ("sequence_parallel", "fastkern", 2)
    assert extra["loss_vs_one_process"] < 1e-4 and len(extra["peak_gib_per_rank"]) == 2
    assert "fastkern_ulysses" in extra["report"] and "lora" in extra["report"]


@pytest.mark.multigpu
def test_same_on_two_gpus_with_nccl(tmp_path):
    """Every check above on cuda:0 and cuda:1 over NCCL, the Triton kernels compiled (not interpreted)."""
    ranks = _spawn(tmp_path, "nccl")
    references = _references(torch.device("cuda", 0))
    for method in ("all_to_all_single", "send_recv"):
        check_all_to_all(ranks, method)
    check_shard_sequence(ranks)
    for case in _sp_worker.CASES:
        check_sharded_step(ranks, references, case)
    check_errors_undo_and_single_rank_group(ranks)
