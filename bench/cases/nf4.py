"""NF4 dequantization: fastkern vs bitsandbytes vs torch eager / torch.compile of fastkern's reference;
the in-tile GEMM fastkern.experimental.nf4_matmul vs dequantize + torch.mm; and the dequantize kernel's launch-config sweep.

Weight 14336x4096 (Llama-3-8B MLP), bf16 out, blocksize 64, double quant on and off. Every
implementation is checked bit-exact against bitsandbytes (or fastkern's PyTorch reference when
bitsandbytes is not installed) before it is timed. The packed weight (29 MiB) fits in the H100's L2, so
timing rotates over 4 copies. Bytes that must move: codes read + absmax read + output written.
nf4_matmul rows (x of 512, 2048, 8192 rows; forward x @ W.T and transposed g @ W) are checked against
dequantize-then-GEMM (relative error < 1e-2), whose time includes the dequantization, as the LoRA layer
redoes it on every call.
"""

import torch

from measure import describe, rel_err

FULL = dict(rows=14336, cols=4096, ms=(512, 2048, 8192))
TINY = dict(rows=128, cols=128, ms=(4,))
BLOCKSIZE, ROTATE = 64, 4


def quantize(w, double_quant, cuda):
    if cuda:
        try:
            import bitsandbytes.functional as bnbf

            packed, state = bnbf.quantize_4bit(w, blocksize=BLOCKSIZE, compress_statistics=double_quant,
                                               quant_type="nf4")
            return packed, state, bnbf
        except ImportError:
            print("bitsandbytes: not installed")
    from fastkern.ops import nf4_quantize

    packed, state = nf4_quantize(w, blocksize=BLOCKSIZE, double_quant=double_quant)
    return packed, state, None


def implementations(state, bnbf, rows, cols, cuda):
    from fastkern.ops import nf4_dequantize
    from fastkern.ops.nf4 import flatten_state
    from fastkern.reference.nf4 import block_scales_reference, nf4_dequantize_reference

    def eager(packed):
        s = flatten_state("bench", packed, state)
        scales = block_scales_reference(s.absmax, s.nested_blocksize, s.code2, s.absmax2, s.offset)
        return nf4_dequantize_reference(s.packed, s.code, scales, s.blocksize, rows, cols, s.dtype)

    impls = {"fastkern": lambda p: nf4_dequantize(p, state), "torch eager": eager}
    if cuda:
        impls["torch.compile"] = torch.compile(eager)
    if bnbf is not None:
        impls["bitsandbytes"] = lambda p: bnbf.dequantize_4bit(p, state, quant_type="nf4")
    return impls


def run(bench):
    p = TINY if bench.tiny else FULL
    rows, cols = p["rows"], p["cols"]
    for double_quant in (True, False):
        shape = f"{rows}x{cols} blocksize {BLOCKSIZE}, double quant {'on' if double_quant else 'off'}"
        w = torch.randn(rows, cols, device=bench.device, dtype=torch.bfloat16)
        packed, state, bnbf = quantize(w, double_quant, bench.cuda)
        copies = [packed.clone() for _ in range(ROTATE)]
        impls = implementations(state, bnbf, rows, cols, bench.cuda)
        truth = impls["bitsandbytes" if bnbf is not None else "torch eager"](packed)
        blocks = rows * cols // BLOCKSIZE
        nbytes = rows * cols // 2 + blocks * (1 if double_quant else 4) + (blocks // 256) * 4 + rows * cols * 2
        # fastkern again last: a first row can carry warm-up effects; the repeat shows them.
        for name, fn in [*impls.items(), ("fastkern (again, last)", impls["fastkern"])]:
            try:
                got = fn(packed)
                if not (got.shape == truth.shape and torch.equal(got.view(torch.int16), truth.view(torch.int16))):
                    bench.add("nf4", "dequantize", shape, name, dtype=torch.bfloat16, error="not bit-exact vs " +
                              ("bitsandbytes" if bnbf is not None else "reference"))
                    continue
                i = [0]

                def step():
                    i[0] = (i[0] + 1) % ROTATE
                    return fn(copies[i[0]])

                ms, graph, peak = bench.ms(step), bench.graph_ms(step, name), bench.peak_mib(lambda: fn(packed))
            except Exception as exc:
                bench.add("nf4", "dequantize", shape, name, dtype=torch.bfloat16, error=describe(exc))
                continue
            bench.add("nf4", "dequantize", shape, name, dtype=torch.bfloat16, ms=ms, peak_mib=peak,
                      throughput=nbytes / ms / 1e6, throughput_unit="GB/s")
            if graph is not None:
                bench.add("nf4", "dequantize GPU (CUDA graph)", shape, name, dtype=torch.bfloat16, ms=graph,
                          throughput=nbytes / graph / 1e6, throughput_unit="GB/s")
        if bench.cuda:
            sweep(bench, packed, state, shape, nbytes, rows, cols)
    matmul(bench, rows, cols, p["ms"])


def sweep(bench, packed, state, shape, nbytes, rows, cols):
    """The dequantize kernel's launch configs (elements per program x warps; streaming stores near the best)."""
    from fastkern.ops.nf4 import dequantize_into, flatten_state

    s = flatten_state("bench", packed, state)
    out = torch.empty(rows, cols, device=bench.device, dtype=torch.bfloat16)
    truth = torch.empty_like(out)
    args = (s.packed, s.code, s.absmax, s.absmax2, s.code2, s.offset, s.blocksize, s.nested_blocksize)
    dequantize_into(truth, *args)
    configs = [(block, warps, "") for block in (1024, 2048, 4096, 8192) for warps in (2, 4, 8)]
    configs += [(block, warps, ".cs") for block in (2048, 4096) for warps in (2, 4)]
    for block, warps, store_cache in configs:
        out.fill_(float("nan"))
        dequantize_into(out, *args, block, warps, store_cache)
        exact = torch.equal(out.view(torch.int16), truth.view(torch.int16))
        label = f"fastkern BLOCK={block} warps={warps}" + (f" stores {store_cache}" if store_cache else "")
        if not exact:
            bench.add("nf4", "dequantize sweep", shape, label, dtype=torch.bfloat16, error="not bit-exact")
            continue
        ms = bench.ms(lambda: dequantize_into(out, *args, block, warps, store_cache), warmup=5, rep=30)
        bench.add("nf4", "dequantize sweep", shape, label, dtype=torch.bfloat16, ms=ms,
                  throughput=nbytes / ms / 1e6, throughput_unit="GB/s")


def in_tile_matmul():
    """fastkern.experimental.nf4_matmul, or fastkern.ops.nf4_matmul in a revision that exported it
    (bench --base; asked of fastkern.ops first, as importing fastkern.experimental there could find the
    installed checkout's), or None."""
    import fastkern

    if hasattr(fastkern.ops, "nf4_matmul"):
        return fastkern.ops.nf4_matmul
    try:
        from fastkern.experimental.nf4_matmul import nf4_matmul
    except ImportError:
        return None
    return nf4_matmul


def matmul(bench, rows, cols, ms_list):
    from fastkern.ops import nf4_dequantize

    nf4_matmul = in_tile_matmul()
    if nf4_matmul is None:
        print("nf4_matmul: not in this revision of fastkern")
        return
    torch.manual_seed(0)
    w = torch.randn(rows, cols, device=bench.device, dtype=torch.bfloat16)
    packed, state, _ = quantize(w, True, bench.cuda)
    modes = {"forward": (cols, lambda x: nf4_matmul(x, packed, state),
                         lambda x: x @ nf4_dequantize(packed, state, dtype=torch.bfloat16).T),
             "transposed": (rows, lambda g: nf4_matmul(g, packed, state, transpose=True),
                            lambda g: g @ nf4_dequantize(packed, state, dtype=torch.bfloat16))}
    for m in ms_list:
        for mode, (width, fused, unfused) in modes.items():
            shape = f"M{m} W {rows}x{cols} double quant"
            x = torch.randn(m, width, device=bench.device, dtype=torch.bfloat16)
            flops = 2 * m * rows * cols
            try:
                err = rel_err(fused(x).float(), unfused(x).float())
                if not err < 1e-2:
                    bench.add("nf4", f"matmul {mode}", shape, "nf4_matmul", dtype=torch.bfloat16,
                              error=f"results differ: rel err {err:.3e}")
                    continue
                for name, fn in (("nf4_matmul", fused), ("nf4_dequantize + mm", unfused)):
                    ms = bench.ms(lambda: fn(x))
                    bench.add("nf4", f"matmul {mode}", shape, name, dtype=torch.bfloat16, ms=ms,
                              throughput=flops / ms / 1e9, throughput_unit="TFLOP/s", rel_err=err)
            except Exception as exc:  # one failing shape should not lose the other rows
                bench.add("nf4", f"matmul {mode}", shape, "nf4_matmul", dtype=torch.bfloat16, error=describe(exc, 200))
