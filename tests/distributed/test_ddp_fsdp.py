"""Patched models under DDP and FSDP2 on CPU: 2 processes, gloo, one SGD step of a tiny Llama.

Both ranks run every scenario of tests/distributed/_worker.py in one spawn (process start-up and the first
Triton-interpreter launch dominate the cost); the single-process references run here. What is checked:

* DDP: parameters after the step identical on both ranks and equal (fp32) to one process stepping on the
  concatenated batch; see _worker's docstring for the loss normalisation that makes this exact.
* FSDP2 (``fully_shard`` per decoder layer and on the root; torch's CPU/gloo path): patched loss and
  gradients equal to the unpatched FSDP run and to the single process; the same with the lm_head in an FSDP
  group of its own (fused loss still taken, gradient reduce-scattered), with accelerate's units (the head in
  a [norm, head] unit, untied and tied), with offloaded checkpointing, and through TRL's fused LM head
  (which gathers the head with ``full_tensor()``) routed to fastkern.
* (2 GPUs only) QLoRA (NF4, bf16 and uint8 quant_storage) under FSDP2: the NF4 bytes sharded, the quant
  state usable, fastkern's NF4 LoRA path taken, loss and gradients equal to the unsharded model's.
* A DTensor lm_head without FSDP: each rank's shard gets its shard of the gradient, with the patched loss
  and with TRL's fused head.
"""

import socket

import pytest
import torch
import torch.distributed as dist

from tests.distributed import _worker

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")
trl = pytest.importorskip("trl")

# fp32 across different reduction orders (all-reduce / reduce-scatter sums, fused vs eager loss).
TOL = dict(rtol=1e-4, atol=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(out_dir, backend: str) -> list[dict]:
    import torch.multiprocessing as mp

    names = [n for n in _worker.SCENARIOS if backend == "nccl" or n not in _worker.GPU_ONLY]
    mp.spawn(_worker.main, args=(_free_port(), str(out_dir), names, backend),
             nprocs=_worker.WORLD, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(_worker.WORLD)]


def _references(device: torch.device) -> dict:
    """Single process on ``device``: the concatenated batch patched and not, and each rank's rows alone."""
    previous, _worker.DEVICE = _worker.DEVICE, device
    try:
        return {True: _worker.reference(True), False: _worker.reference(False),
                "lora": _worker.reference(True, lora=True), "lora unpatched": _worker.reference(False, lora=True),
                "tied": _worker.reference(True, tied=True),
                "half": [_worker.reference(True, half=r) for r in range(_worker.WORLD)]}
    finally:
        _worker.DEVICE = previous


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return _spawn(tmp_path_factory.mktemp("ranks"), "gloo")


@pytest.fixture(scope="module")
def single():
    return _references(torch.device("cpu"))


def _close(got: dict, want: dict, what: str):
    assert got.keys() == want.keys(), what
    for name in want:
        torch.testing.assert_close(got[name], want[name], **TOL, msg=lambda m: f"{what} {name}: {m}")


def _matches_single(result, ref, what):
    torch.testing.assert_close(result["loss"], ref["loss"], **TOL)
    _close(result["grads"], ref["grads"], f"{what} grads")
    _close(result["params"], ref["params"], f"{what} params")


def check_ddp(ranks, single, scenario="ddp"):
    r0, r1 = ranks[0][scenario], ranks[1][scenario]
    assert r0["logits_none"], f"{scenario}: the fused loss did not run under DDP"
    for name, p in r0["params"].items():
        assert torch.equal(p, r1["params"][name]), f"{scenario}: {name} differs across ranks after the step"
    if scenario != "ddp":
        # every decoder layer took the reentrant checkpoint (its parameters as inputs), on both ranks
        for r in (r0, r1):
            assert r["reentrant_calls"] == r["layers"] > 0, (r["reentrant_calls"], r["layers"])
    lora = scenario.endswith("lora")
    _matches_single(r0, single["lora" if lora else True], scenario)
    _matches_single(r0, single["lora unpatched" if lora else False], f"{scenario} vs unpatched")


FSDP_SCENARIOS = ["fsdp", "fsdp_head", "fsdp_accelerate", "fsdp_offload", "fsdp_recompute", "trl_fsdp_head"]
DDP_SCENARIOS = ["ddp", "ddp_recompute", "ddp_recompute_static", "ddp_recompute_lora", "ddp_offload_lora"]


def check_fsdp(ranks, single, scenario):
    for rank in range(_worker.WORLD):
        got, plain = ranks[rank][scenario], ranks[rank]["fsdp_plain"]
        if scenario == "trl_fsdp_head":
            # TRL gathers the sharded head with full_tensor(): a new tensor every call, still routed here
            assert (got["fastkern_calls"], got["trl_calls"]) == (1, 0), got
        else:
            assert got["logits_none"], f"{scenario}: the fused loss did not run (fell back to logits)"
        torch.testing.assert_close(got["loss"], plain["loss"], **TOL)
        _close(got["grads"], plain["grads"], f"{scenario} vs unpatched FSDP, rank {rank}, grads")
        _matches_single(got, single[True], f"{scenario} rank {rank}")
    for name, p in ranks[0][scenario]["params"].items():
        assert torch.equal(p, ranks[1][scenario]["params"][name]), f"{scenario}: {name} differs across ranks"


def check_fsdp_tied(ranks, single):
    """accelerate's layout with tied embeddings (embedding, norm and head in one unit), against one process
    with the same tied model."""
    for rank in range(_worker.WORLD):
        got = ranks[rank]["fsdp_accelerate_tied"]
        assert got["logits_none"], "the fused loss did not run"
        _matches_single(got, single["tied"], f"tied rank {rank}")


def check_dtensor_head(ranks, single, path):
    for rank in range(_worker.WORLD):
        got, ref = ranks[rank]["dtensor_head"][path], single["half"][rank]
        if path == "loss":
            assert got["logits_none"], "the fused loss did not run with a DTensor head"
        else:
            assert (got["fastkern_calls"], got["trl_calls"]) == (1, 0), got
        torch.testing.assert_close(got["loss"], ref["loss"], **TOL)
        want = dict(ref["grads"])
        want["lm_head.weight"] = want["lm_head.weight"].chunk(_worker.WORLD)[rank]  # Shard(0) is torch.chunk
        _close(got["grads"], want, f"dtensor head via {path}, rank {rank}")


def check_qlora(ranks):
    for rank in range(_worker.WORLD):
        for storage, (plain, sharded) in ranks[rank]["qlora_fsdp"].items():
            assert plain["nf4_path"] and sharded["nf4_path"], "fastkern's NF4 LoRA path was not taken"
            # the NF4 bytes are sharded (each rank holds about half of them), the quant state stays usable
            assert sharded["sharded_bytes_fraction"] <= 0.5 + 1e-3 and sharded["quant_state_kept"], storage
            torch.testing.assert_close(sharded["loss"], plain["loss"], **TOL)
            _close(sharded["grads"], plain["grads"], f"qlora {storage} rank {rank}")


@pytest.mark.parametrize("scenario", DDP_SCENARIOS)
def test_ddp_ranks_agree_and_match_single_process(ranks, single, scenario):
    check_ddp(ranks, single, scenario)


@pytest.mark.parametrize("scenario", FSDP_SCENARIOS)
def test_fsdp2_matches_unpatched_fsdp_and_single_process(ranks, single, scenario):
    check_fsdp(ranks, single, scenario)


def test_fsdp2_accelerate_layout_with_tied_embeddings(ranks, single):
    check_fsdp_tied(ranks, single)


@pytest.mark.parametrize("path", ["loss", "trl"])
def test_dtensor_head_gets_its_shard_of_the_gradient(ranks, single, path):
    check_dtensor_head(ranks, single, path)


@pytest.mark.multigpu
def test_same_on_two_gpus_with_nccl(tmp_path):
    """Every scenario above on cuda:0 and cuda:1 over NCCL, the Triton kernels compiled (not interpreted)."""
    ranks = _spawn(tmp_path, "nccl")
    single = _references(torch.device("cuda", 0))
    for scenario in DDP_SCENARIOS:
        check_ddp(ranks, single, scenario)
    for scenario in FSDP_SCENARIOS:
        check_fsdp(ranks, single, scenario)
    check_fsdp_tied(ranks, single)
    check_qlora(ranks)
    for path in ("loss", "trl"):
        check_dtensor_head(ranks, single, path)
