"""The longest trainable sequence (``--search``) and the extrapolation to full depth (``--extrapolate``) of
bench/e2e/long_context.py.

Search: the longest sequence, in steps of ``--granularity`` tokens, whose single optimizer step completes
with a finite loss under the device cap. It starts at fastkern.plan_memory's predicted limit for the
model as built (its layers, LoRA rank, QLoRA, the variant's options, the cap), gallops (step doubling)
up from there while probes fit, or down while they do not, then bisects between the last fit and the
first miss. Each probe is isolated (long_context.probe: any failure becomes a row, the step's leftovers
are freed: garbage collection, the offloader's pool, torch.cuda.empty_cache) so an out-of-memory probe
does not poison the next. Before each probe the time it would take is estimated from the last one
(quadratic in the length: attention dominates at long T); when it would pass ``--time-budget-s`` the
search stops and reports the best length known so far with the reason. Fit is assumed monotone in the
length. A CUDA error other than out of memory (an illegal address) leaves the process unusable: every
later probe then fails and the search reports the best length before it.

Extrapolation (docs/long_context.md): from runs at layers A < B with the same lengths, per length,

    t(L) = t_fixed + L · t_layer,   t_layer = (t(B) − t(A)) / (B − A),   t_fixed = t(A) − A · t_layer
    device_peak(L) = device_peak(A) + w · (L − A) + T·H·2 bytes · (device_layers(L) − device_layers(A))
    w = (device_peak(B) − device_peak(A)) / (B − A) − T·H·2 bytes · (device_layers(B) − device_layers(A)) / (B − A)

where device_layers(L) is the number of layers whose checkpointed input ([T, H] bf16) stays on the device:
all L for the variants that keep checkpoints on the device, max(0, L − host_layers) with offloaded
checkpoints (host_layers: how many pinned buffers of that size fit ``host_gib``; all of them when the run
gave no budget). w is what else each layer keeps on the device (its weights, NF4 or not, adapters, their
gradients and optimizer state), measured between A and B with the checkpoint term taken out; the raw
slope is reported too.
"""

from __future__ import annotations

import json
import os
import time

from bench import schema
from bench.e2e import long_context as lc

GIB, MIB = 1 << 30, 1 << 20


class _Stop(Exception):
    pass


def search_longest(fits, *, start: int, granularity: int, max_len: int, budget_s: float | None = None,
                   clock=time.perf_counter, estimate_s=None) -> dict:
    """Largest multiple of ``granularity`` in [granularity, max_len] for which ``fits(n)`` is true, assuming
    fits is true up to a boundary and false past it.

    ``fits(n) -> (bool, seconds)``; ``estimate_s(n, probes) -> seconds`` predicts a probe's time from the
    ones before (None: no prediction); with ``budget_s`` a probe whose estimate would end past the budget
    (counted from the call) is not run. Returns ``best`` (0: not even ``granularity`` fits), ``first_miss``
    (the shortest length probed that did not fit, None if none), ``probes`` [(length, fits, seconds)] in
    order, and ``stopped``: "converged", "max length" (max_len itself fits) or "time budget"."""
    if granularity < 1 or max_len < granularity:
        raise ValueError(f"search: need 1 <= granularity <= max_len, got {granularity}, {max_len}")
    started = clock()
    probes: list[tuple[int, bool, float]] = []
    max_k = max_len // granularity

    def check(k: int) -> bool:
        n = k * granularity
        if budget_s is not None and probes and estimate_s is not None:
            if clock() - started + estimate_s(n, probes) > budget_s:
                raise _Stop
        ok, seconds = fits(n)
        probes.append((n, bool(ok), float(seconds)))
        return bool(ok)

    good, bad = 0, max_k + 1  # invariants: good fits (0: nothing known to fit), bad does not (max_k + 1: unknown)
    stopped = "converged"
    try:
        k = min(max(1, start // granularity), max_k)
        if check(k):
            good, step = k, 1
            while good < max_k:  # gallop up
                cand = min(good + step, max_k)
                if not check(cand):
                    bad = cand
                    break
                good, step = cand, step * 2
        else:
            bad, step = k, 1
            while bad > 1:  # gallop down
                cand = max(bad - step, 1)
                if check(cand):
                    good = cand
                    break
                bad, step = cand, step * 2
        while bad - good > 1 and bad <= max_k:  # bisect
            mid = (good + bad) // 2
            good, bad = (mid, bad) if check(mid) else (good, mid)
        if good == max_k:
            stopped = "max length"
    except _Stop:
        stopped = "time budget"
    misses = [n for n, ok, _ in probes if not ok]
    return dict(best=good * granularity, first_miss=min(misses) if misses else None, probes=probes, stopped=stopped)


def quadratic_estimate(n: int, probes) -> float:
    """A probe's time from the nearest completed probe at or below ``n``: attention makes a long step's time
    grow with T²; a longer step is never assumed cheaper."""
    done = [(m, s) for m, ok, s in probes if s > 0]
    if not done:
        return 0.0
    below = [(m, s) for m, s in done if m <= n]
    m, s = max(below) if below else min(done)
    return s * max(1.0, (n / m) ** 2)


def predicted_limit(model, args, cap: int | None) -> int | None:
    """fastkern.plan_memory's longest sequence for this model, variant and cap (None without a cap).
    The unpatched variant is predicted with an untiled MLP and, in the plain loop, transformers' loss over
    materialized [T, V] logits (``loss=False``); under TRL its own chunked LM head stands in for the
    loss, predicted as a chunked loss. Either way it is only the search's starting point."""
    import fastkern

    if cap is None:
        return None
    options = {"long": dict(checkpointing="offload", tiled_mlp=lc.TILED[args.tiled_mlp]),
               "defaults": dict(checkpointing="device", tiled_mlp=lc.TILED[args.tiled_mlp]),
               "unpatched": dict(checkpointing="device", tiled_mlp=False, mlp=False,
                                 loss=getattr(args, "trainer", "loop") == "trl")}[args.variant]
    host = None if args.host_gib is None or args.variant != "long" else int(args.host_gib * GIB)
    plan = fastkern.plan_memory(model, 1, lora_rank=args.lora_r, qlora=args.qlora, options=options,
                                device_bytes=cap, host_bytes=host)
    return plan.max_seq_len


def run_search(args, save=lambda result: None) -> dict:
    device, cap, stepper, out = lc.setup(args, args.search_max)
    predicted = predicted_limit(stepper.model, args, cap)
    start = args.search_start or predicted or args.granularity
    summary = dict(summary=True, predicted_max_seq_len=predicted, start=start, granularity=args.granularity,
                   search_max=args.search_max, time_budget_s=args.time_budget_s)
    started = time.perf_counter()
    if not lc.warm_up(stepper, args, start, out):
        return out
    rows_by_len = {}

    def fits(n: int):
        row = lc.probe(stepper, n, device, cap)
        out["results"].append(row)
        rows_by_len[n] = row
        save(out)
        return row["ok"], row.get("step_s", 0.0)

    budget = None if not args.time_budget_s else args.time_budget_s - (time.perf_counter() - started)
    found = search_longest(fits, start=start, granularity=args.granularity, max_len=args.search_max,
                           budget_s=budget, estimate_s=quadratic_estimate)
    summary.update(longest_seq_len=found["best"], first_miss=found["first_miss"], stopped=found["stopped"],
                   probes=[n for n, _, _ in found["probes"]], search_s=round(time.perf_counter() - started, 1),
                   best_row=rows_by_len.get(found["best"]))
    out["results"].append(summary)
    print(f"search: longest trainable {found['best']} tokens (granularity {args.granularity}, first miss "
          f"{found['first_miss']}, {len(found['probes'])} probes, {found['stopped']}); plan_memory predicted "
          f"{predicted}")
    return out


def summary_row(env: dict, result: dict, s: dict, case: str, impl: str, common_extra: dict) -> dict:
    """The search's row: the longest length measured next to the predicted one; time, throughput and peak
    of the step at that length."""
    best = s.get("best_row") or {}
    cuda = result["device_type"] == "cuda"
    peak = best.get("peak_allocated_gib") if cuda else best.get("tracked_peak_mib")
    cap = result["memory_cap_gib"]
    cap_text = "none" if cap is None else f"{cap:g} GiB" if cap >= 1 else f"{cap * 1024:g} MiB"
    shape = f"{result['size']} x{result['layers']} layers, cap {cap_text}"
    extra = {k: v for k, v in s.items() if k not in ("summary", "best_row")}
    extra.update({k: best[k] for k in ("attention_backend", "host_peak_rss_gib", "offload_pool_gib",
                                       "peak_reserved_gib") if k in best})
    return schema.make_row(
        env, op="long_context", case=case, shape=shape,
        dtype="bfloat16", impl=impl, ms=best["step_s"] * 1e3 if best.get("step_s") else None,
        throughput=best.get("tokens_per_s"), throughput_unit="tokens/s" if best.get("tokens_per_s") else None,
        loss=best.get("loss"), peak_mib=None if peak is None else (peak * 1024 if cuda else peak),
        peak_scope="total" if cuda else "host",
        error=None if best.get("step_s") else f"no length fits (search {s['stopped']})",
        **extra, **{k: v for k, v in common_extra.items() if k != "report"})


# ---- extrapolation --------------------------------------------------------------------------------


def _step_rows(directory: str) -> list[dict]:
    path = directory if directory.endswith(".json") else os.path.join(directory, "long_context.json")
    return [r for r in schema.read(path) if r["op"] == "long_context" and r["ms"] is not None
            and r["error"] is None and "seq_len" in r["extra"] and not schema.is_extrapolated(r)]


def _device_layers(layers: int, variant: str, seq_len: int, hidden: int, host_gib) -> int:
    """Layers whose checkpointed input stays on the device."""
    if variant != "long":
        return layers
    if host_gib is None:
        return 0
    from fastkern.capacity import pinned_bytes

    host_layers = int(host_gib * GIB) // pinned_bytes(seq_len * hidden * 2)
    return max(0, layers - host_layers)


def extrapolate(rows_a: list[dict], rows_b: list[dict], env: dict | None = None,
                target_layers: int | None = None) -> list[dict]:
    """Rows at ``target_layers`` (default: the shape's full depth) from two sets of measured rows at fewer
    layers, matched by (case, impl, seq_len); labelled extrapolated."""
    by_key_b = {(r["case"], r["impl"], r["extra"]["seq_len"]): r for r in rows_b}
    out = []
    for a in rows_a:
        b = by_key_b.get((a["case"], a["impl"], a["extra"]["seq_len"]))
        if b is None:
            continue
        la, lb = a["extra"]["layers"], b["extra"]["layers"]
        if la == lb:
            raise ValueError(f"extrapolate: both runs have {la} layers")
        if la > lb:
            a, b, la, lb = b, a, lb, la
        x = a["extra"]
        t, hidden, variant = x["seq_len"], x["hidden"], x["variant"]
        target = target_layers or x["full_layers"]
        t_layer = (b["ms"] - a["ms"]) / (lb - la) / 1e3
        t_fixed = a["ms"] / 1e3 - la * t_layer
        seconds = t_fixed + target * t_layer
        ckpt_mib = t * hidden * 2 / MIB
        device_layers = {n: _device_layers(n, variant, t, hidden, x.get("host_gib")) for n in (la, lb, target)}
        peak = measured_slope = per_layer = None
        if a["peak_mib"] is not None and b["peak_mib"] is not None:
            measured_slope = (b["peak_mib"] - a["peak_mib"]) / (lb - la)
            per_layer = measured_slope - ckpt_mib * (device_layers[lb] - device_layers[la]) / (lb - la)
            peak = a["peak_mib"] + per_layer * (target - la) + ckpt_mib * (device_layers[target] - device_layers[la])
        pool, host_layers = x.get("offload_pool_gib"), None
        if variant == "long" and pool is not None:  # the measured pool per host layer times the host layers at depth
            host_layers = target - _device_layers(target, variant, t, hidden, x.get("host_gib"))
            pool = pool / (la - _device_layers(la, variant, t, hidden, x.get("host_gib")) or 1) * host_layers
        else:
            pool = None
        out.append(schema.make_row(
            env or {k: a[k] for k in ("device", "torch", "triton", "transformers", "commit")},
            op="long_context", case=a["case"], shape=f"{x['size']} x{target} layers T{t}", dtype=a["dtype"],
            impl=a["impl"], ms=seconds * 1e3, throughput=t / seconds, throughput_unit="tokens/s",
            peak_mib=peak, peak_scope=a["peak_scope"] if peak is not None else None, extrapolated=True,
            seq_len=t, layers=target, size=x["size"], variant=variant, trainer=x.get("trainer"), hidden=hidden,
            full_layers=x["full_layers"], from_layers=[la, lb], t_fixed_s=round(t_fixed, 4),
            t_layer_s=round(t_layer, 4), checkpoint_mib_per_device_layer=round(ckpt_mib, 3),
            measured_peak_slope_mib_per_layer=None if measured_slope is None else round(measured_slope, 3),
            resident_mib_per_layer=None if per_layer is None else round(per_layer, 3),
            host_pool_gib=None if pool is None else round(pool, 3), host_layers=host_layers))
    return out


def compare_full(extrapolated: list[dict], full: list[dict]) -> list[dict]:
    """Per extrapolated row with a measured full-depth row (same case, impl, length, layers): both times and
    peaks and their ratios."""
    by_key = {(r["case"], r["impl"], r["extra"]["seq_len"], r["extra"]["layers"]): r for r in full}
    out = []
    for e in extrapolated:
        m = by_key.get((e["case"], e["impl"], e["extra"]["seq_len"], e["extra"]["layers"]))
        if m is None:
            continue
        out.append(dict(case=e["case"], impl=e["impl"], seq_len=e["extra"]["seq_len"], layers=e["extra"]["layers"],
                        extrapolated_s=e["ms"] / 1e3, measured_s=m["ms"] / 1e3, time_ratio=e["ms"] / m["ms"],
                        extrapolated_peak_mib=e["peak_mib"], measured_peak_mib=m["peak_mib"],
                        peak_ratio=None if not (e["peak_mib"] and m["peak_mib"]) else e["peak_mib"] / m["peak_mib"]))
    return out


def extrapolate_main(args) -> int:
    rows_a, rows_b = _step_rows(args.extrapolate[0]), _step_rows(args.extrapolate[1])
    rows = extrapolate(rows_a, rows_b)
    if not rows:
        print("extrapolate: no (case, impl, length) measured in both runs")
        return 1
    path = os.path.join(args.out, "long_context_extrapolated.json")
    schema.write(path, rows)
    lines = ["| case | impl | layers | tokens | step s (extrapolated) | tokens/s | peak MiB (extrapolated) | "
             "t_fixed s | t_layer s | measured peak slope MiB/layer |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        x = r["extra"]
        peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        lines.append(f"| {r['case']} | {r['impl']} | {x['layers']} | {x['seq_len']} | {r['ms'] / 1e3:.2f} | "
                     f"{r['throughput']:.0f} | {peak} | "
                     f"{x['t_fixed_s']} | {x['t_layer_s']} | {x['measured_peak_slope_mib_per_layer']} |")
    print("\n".join(lines))
    if args.full:
        checks = compare_full(rows, _step_rows(args.full))
        with open(os.path.join(args.out, "long_context_extrapolation_check.json"), "w") as f:
            json.dump(checks, f, indent=1)
        for c in checks:
            print(f"check {c['impl']} T{c['seq_len']} x{c['layers']}: extrapolated {c['extrapolated_s']:.2f} s vs "
                  f"measured {c['measured_s']:.2f} s (x{c['time_ratio']:.3f}); peak ratio {c['peak_ratio']}")
        if not checks:
            print("check: no full-depth row matches an extrapolated one")
    print(f"wrote {path}")
    if args.plot:
        from bench.plot import memory_vs_length_png

        memory_vs_length_png(rows_a + rows_b + rows, args.plot)
    return 0
