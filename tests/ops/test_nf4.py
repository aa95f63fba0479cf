"""nf4_dequantize / nf4_quantize against bitsandbytes' own CPU (de)quantization, bit for bit."""

import pytest
import torch
from hypothesis import example, given, strategies as st

from fastkern.ops import NF4State, nf4_dequantize, nf4_quantize

bnbf = pytest.importorskip("bitsandbytes.functional")
from tests.bnb_reference import bnb_dequantize_4bit  # noqa: E402
from tests.profiles import bounded  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]


def _bnb(weight, blocksize, double_quant, quant_storage=torch.uint8):
    return bnbf.quantize_4bit(weight, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4",
                              quant_storage=quant_storage)


def _bnb_dequant(packed, state):
    return bnb_dequantize_4bit(packed, state)  # bitsandbytes' generic kernel: tests/bnb_reference.py says why


def _assert_bitexact(got, ref):
    assert got.dtype == ref.dtype and got.shape == ref.shape
    # Compare bits, so -0.0 vs 0.0 and NaN patterns count too. reshape(-1), not .contiguous(): a
    # [2, 1] transpose with strides (1, 2) counts as contiguous but cannot be viewed as bytes.
    assert torch.equal(got.reshape(-1).view(torch.uint8), ref.reshape(-1).view(torch.uint8))


@bounded(10)
@given(
    rows=st.integers(1, 70), cols=st.integers(1, 300), blocksize=st.sampled_from(BLOCKSIZES),
    double_quant=st.booleans(), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16),
)
def test_dequantize_bitexact_vs_bitsandbytes(rows, cols, blocksize, double_quant, dtype, seed, poison_empty):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g) * 3).to(dtype)
    packed, state = _bnb(w, blocksize, double_quant)
    _assert_bitexact(nf4_dequantize(packed, state), _bnb_dequant(packed, state))


@pytest.mark.parametrize("shape,blocksize,double_quant", [((8, 128), 64, True), ((5, 256), 128, False),
                                                          ((3, 64), 64, False), ((1, 4096), 4096, True)])
def test_reference_is_bitsandbytes_public_dequantization_where_rows_hold_whole_blocks(shape, blocksize, double_quant):
    # tests/bnb_reference.py swaps only the 4-bit lookup kernel; where bitsandbytes' native CPU kernel is
    # right (rows made of whole blocks) the two agree bit for bit, the transposed packed view included.
    w = torch.randn(*shape, dtype=torch.bfloat16)
    packed, state = _bnb(w, blocksize, double_quant)
    _assert_bitexact(bnb_dequantize_4bit(packed, state), bnbf.dequantize_4bit(packed, state, quant_type="nf4"))
    _assert_bitexact(bnb_dequantize_4bit(packed.t(), state), bnbf.dequantize_4bit(packed.t(), state, quant_type="nf4"))


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float32, torch.int8])
def test_quant_storage_views_same_bytes(storage):
    w = torch.randn(24, 40, dtype=torch.bfloat16)
    packed, state = _bnb(w, 64, True, quant_storage=storage)
    assert packed.dtype == storage
    _assert_bitexact(nf4_dequantize(packed, state), _bnb_dequant(packed, state))


def test_transposed_packed_view_matches_bitsandbytes():
    w = torch.randn(16, 72, dtype=torch.float16)
    packed, state = _bnb(w, 128, False)
    got = nf4_dequantize(packed.t(), state)
    _assert_bitexact(got, _bnb_dequant(packed.t(), state))
    assert got.shape == (72, 16)


def test_output_dtype_override():
    w = torch.randn(9, 64, dtype=torch.bfloat16)
    packed, state = _bnb(w, 64, True)
    state.dtype = torch.float32
    ref = _bnb_dequant(packed, state)
    got = nf4_dequantize(packed, _bnb(w, 64, True)[1], dtype=torch.float32)
    _assert_bitexact(got, ref)


@bounded(8)
@given(rows=st.integers(1, 40), cols=st.integers(1, 200), blocksize=st.sampled_from(BLOCKSIZES),
       double_quant=st.booleans(), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
@example(rows=39, cols=129, blocksize=128, double_quant=True, dtype=torch.bfloat16, seed=1004)
def test_quantize_round_trip_vs_bitsandbytes(rows, cols, blocksize, double_quant, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g).to(dtype)
    packed, state = nf4_quantize(w, blocksize=blocksize, double_quant=double_quant)
    ref_packed, ref_state = _bnb(w, blocksize, double_quant)
    # The 4-bit codes and the fp32 absmax are the same bytes bitsandbytes produces.
    assert torch.equal(packed, ref_packed)
    if double_quant:
        assert torch.equal(state.offset, ref_state.offset)
        assert torch.equal(state.state2.absmax, ref_state.state2.absmax)
        assert torch.equal(state.state2.code, ref_state.state2.code)
        # bitsandbytes' CPU C kernel searches the 8-bit map with its own thresholds and picks the
        # neighbouring level in near-ties; fastkern rounds to nearest (as bitsandbytes' PyTorch backend).
        # A group whose absmax2 is 0 (all blocks equal the offset) decodes to the offset whatever code.
        # The 8-bit dynamic map has several levels within 1e-4 of 0 (8-bit resolution is ~1e-2), so a block whose absmax equals the
        # offset may get codes far apart that decode to (almost) the same scale: compare decoded scales.
        live = (state.state2.absmax > 0).repeat_interleave(256)[: state.absmax.numel()]
        group = state.state2.absmax.repeat_interleave(256)[: state.absmax.numel()]
        decoded = state.state2.code[state.absmax.long()] * group
        ref_decoded = ref_state.state2.code[ref_state.absmax.long()] * group
        near = (state.absmax.int() - ref_state.absmax.int()).abs().le(1) | (decoded - ref_decoded).abs().le(1e-4 * group)
        assert near[live].all()
    else:
        assert torch.equal(state.absmax, ref_state.absmax)
    # bitsandbytes reads fastkern's state and bytes and gets what fastkern's dequantizer gets.
    bnb_state = bnbf.QuantState(absmax=state.absmax, shape=state.shape, code=state.code, dtype=state.dtype,
                                blocksize=state.blocksize, quant_type="nf4", offset=state.offset,
                                state2=None if state.state2 is None else bnbf.QuantState(
                                    absmax=state.state2.absmax, code=state.state2.code, blocksize=256,
                                    dtype=torch.float32))
    got = nf4_dequantize(packed, state)
    _assert_bitexact(got, _bnb_dequant(packed, bnb_state))
    # Dequantization error is what 4-bit NF4 gives: well below the block's absmax.
    assert ((got.float() - w.float()).abs() <= w.float().abs().max() * 0.2 + 1e-6).all()


@pytest.mark.parametrize("double_quant", [True, False])
def test_references_in_chunks_equal_one_pass(monkeypatch, double_quant):
    """The quantize and dequantize references step through the weight REFERENCE_CHUNK elements at a
    time (bounded memory on huge weights): with chunks of 2 blocks, an odd element count and a short
    last block, the bytes and values equal bitsandbytes' (one pass)."""
    from fastkern import runtime
    from fastkern.reference import nf4 as nf4_reference

    w = torch.randn(13, 37, generator=torch.Generator().manual_seed(3))  # 481 elements: odd, short last block
    ref_packed, ref_state = _bnb(w, 64, double_quant)
    monkeypatch.setattr(nf4_reference, "REFERENCE_CHUNK", 128)
    packed, state = nf4_quantize(w, blocksize=64, double_quant=double_quant)
    assert torch.equal(packed, ref_packed)
    if not double_quant:
        assert torch.equal(state.absmax, ref_state.absmax)
    want = nf4_dequantize(packed, state)  # the kernel (interpreted on CPU): no chunking
    with runtime.force_reference():
        got = nf4_dequantize(packed, state)
    _assert_bitexact(got, want)


@pytest.mark.parametrize("cols,block", [(128, 64), (128, 128), (96, 64), (40, 2048)])
@pytest.mark.parametrize("double_quant", [True, False])
def test_strided_output_modes(cols, block, double_quant, poison_empty):
    """dequantize_into a [rows, cols] slice of a wider buffer (the LoRA layer's [W | B] operand):
    rows inside one program (cols % block == 0) and rows split across programs."""
    from fastkern.ops.nf4 import dequantize_into, flatten_state

    w = torch.randn(7, cols, dtype=torch.bfloat16)
    packed, state = nf4_quantize(w, blocksize=32, double_quant=double_quant)
    s = flatten_state("test", packed, state)
    buf = torch.full((7, cols + 5), 3.0, dtype=torch.bfloat16)
    dequantize_into(buf[:, :cols], s.packed, s.code, s.absmax, s.absmax2, s.code2, s.offset, s.blocksize,
                    s.nested_blocksize, block, 2)
    _assert_bitexact(buf[:, :cols], nf4_dequantize(packed, state))
    assert (buf[:, cols:] == 3.0).all()  # nothing written past the slice


def test_fp4_state_rejected():
    w = torch.randn(8, 64)
    packed, state = bnbf.quantize_4bit(w, quant_type="fp4")
    with pytest.raises(ValueError, match="quant_type.*fp4"):
        nf4_dequantize(packed, state)


def test_bad_inputs_named():
    w = torch.randn(8, 64)
    packed, state = nf4_quantize(w)
    bad_shape = NF4State(state.absmax, (8, 66), state.code, state.dtype, 64, state2=state.state2, offset=state.offset)
    with pytest.raises(ValueError, match="packed"):
        nf4_dequantize(packed, bad_shape)
    with pytest.raises(TypeError, match="packed"):
        nf4_dequantize(packed.to(torch.int32), state)
    with pytest.raises(TypeError, match="dtype"):
        nf4_dequantize(packed, state, dtype=torch.int8)
    wrong_absmax = NF4State(state.absmax.float(), (8, 64), state.code, state.dtype, 64, state2=state.state2,
                            offset=state.offset)
    with pytest.raises(TypeError, match="quant_state.absmax"):
        nf4_dequantize(packed, wrong_absmax)
    with pytest.raises(ValueError, match="blocksize"):
        nf4_dequantize(packed, NF4State(state.absmax, (8, 64), state.code, state.dtype, 48))
    with pytest.raises(TypeError, match="quant_state"):
        nf4_dequantize(packed, object())
    with pytest.raises(ValueError, match="blocksize"):
        nf4_quantize(w, blocksize=100)
    with pytest.raises(TypeError, match="weight"):
        nf4_quantize(w.double())


def test_state_cache_sees_every_change_of_the_state():
    """Validation is cached per state object; a changed state must be re-read and re-checked."""
    from fastkern.ops import nf4 as nf4_module

    packed, state = _bnb(torch.randn(8, 64), 64, True)
    first = nf4_dequantize(packed, state)
    assert id(state) in nf4_module._STATE_CACHE
    _assert_bitexact(nf4_dequantize(packed, state), first)  # cache hit, same result
    state.state2.absmax.mul_(2)  # in-place edit: seen through the cached views
    _assert_bitexact(nf4_dequantize(packed, state), _bnb_dequant(packed, state))
    _, other = _bnb(torch.randn(8, 64) * 5, 64, True)
    state.absmax, state.state2, state.offset = other.absmax, other.state2, other.offset  # swapped fields
    _assert_bitexact(nf4_dequantize(packed, state), _bnb_dequant(packed, state))
    state.state2.absmax.data = state.state2.absmax.data * 3  # same object, new memory
    _assert_bitexact(nf4_dequantize(packed, state), _bnb_dequant(packed, state))
    state.blocksize = 128  # a now-invalid state is checked again, not served from the cache
    with pytest.raises(ValueError, match="absmax"):
        nf4_dequantize(packed, state)
    key = id(state)
    del state
    assert key not in nf4_module._STATE_CACHE  # the entry dies with its state


def test_compile_fullgraph():
    w = torch.randn(6, 64, dtype=torch.bfloat16)
    packed, state = nf4_quantize(w)
    fn = torch.compile(lambda p: nf4_dequantize(p, state) * 2, fullgraph=True, backend="aot_eager")
    _assert_bitexact(fn(packed), nf4_dequantize(packed, state) * 2)


@pytest.mark.gpu
@pytest.mark.parametrize("double_quant", [True, False])
def test_dequantize_bitexact_gpu_real_size(double_quant):
    w = torch.randn(14336, 4096, dtype=torch.bfloat16, device="cuda")
    packed, state = _bnb(w, 64, double_quant)
    _assert_bitexact(nf4_dequantize(packed, state), _bnb_dequant(packed, state))
    packed, state = _bnb(w[:1000, :1002].contiguous(), 256, double_quant, quant_storage=torch.bfloat16)
    _assert_bitexact(nf4_dequantize(packed, state), _bnb_dequant(packed, state))
