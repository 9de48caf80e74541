"""GPU benchmark of the CUDA jagged attention kernels (run by benchmarks/gpu_check.sh).

Cases (as the CPU benchmark, issue 3): (a) ``summary``: 8 summary queries per sample attending to a sequence of
length uniform in [0, L] (InterFormer's PMA/CLS direction); (b) ``self-causal``: causal self-attention over the
same jagged sequences; (c) ``full``: every sequence at length L, causal. For B in --batch, H in --heads, Dh in
--dims; forward and forward+backward. Baselines in the same run: ``F.scaled_dot_product_attention`` on padded
``[B, H, L, Dh]`` tensors with a boolean mask (padding done beforehand, not timed: the most favourable setting
for the baseline), without a mask (``is_causal``) on the full-length case where padding wastes nothing, and
FlashAttention-2's ``flash_attn_varlen_func`` when it is installed and torch's ``varlen_attn`` (fp16/bf16). Also
measured: our kernel with fp32 on tensor cores as tf32 (``lattice tf32``), and the dispatched path
(``lattice.ops.jagged_attention_output``, the backend it picks in parentheses), whose time against the best of padded
SDPA and varlen_attn is issue 30's target (>= 0.9x, printed at the end). Prints medians (CUDA events),
ratios (their time / ours: > 1 means lattice is faster) and achieved GFLOP/s counting only visible
(query, key) pairs (4 * pairs * Dh * H for the forward, 2.5x that for the backward); writes JSON (``--out``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._common import cuda_median_ms  # noqa: E402
from lattice.benchmark.attention import lengths_for, offsets_of, visible_pairs  # noqa: E402


def pad(x, offsets, L):
    """[N, H, Dh] jagged -> [B, H, L, Dh] zero-padded."""
    B = offsets.numel() - 1
    lengths = offsets[1:] - offsets[:-1]
    pos = torch.arange(L, device=x.device)
    valid = pos[None, :] < lengths[:, None].to(x.device)
    out = x.new_zeros(B, L, *x.shape[1:])
    out[valid] = x
    return out.transpose(1, 2).contiguous(), valid


def run_case(case, B, H, Dh, L, dtype, warmup, repeat, seed=0):
    ops = torch.ops.lattice
    g = torch.Generator().manual_seed(seed)
    lq, lk, causal = lengths_for(case, B, L, g)
    qo, ko = offsets_of(lq), offsets_of(lk)
    nq, nk = int(qo[-1]), int(ko[-1])
    q, k, v, go = (torch.randn(n, H, Dh, device="cuda", dtype=dtype) for n in (nq, nk, nk, nq))
    qo_d, ko_d = qo.cuda(), ko.cuda()
    scale = Dh ** -0.5
    pairs = visible_pairs(lq, lk, causal)
    fwd_flops = 4.0 * pairs * Dh * H
    results = []

    def add(mode, impl, ms):
        flops = fwd_flops * (1.0 if mode == "forward" else 3.5)
        results.append(dict(case=case, mode=mode, impl=impl, ms=ms, gflops=flops / ms / 1e6, B=B, H=H, Dh=Dh, L=L,
                            dtype=str(dtype).replace("torch.", "")))

    # --- lattice ---------------------------------------------------------------------------------------------
    fwd = lambda: ops.jagged_attention(q, qo_d, k, v, ko_d, scale, causal)  # noqa: E731
    add("forward", "lattice", cuda_median_ms(fwd, warmup, repeat))

    def fwd_bwd():
        out, lse = fwd()
        return ops.jagged_attention_backward(go, q, qo_d, k, v, ko_d, out, lse, scale, causal)

    add("forward+backward", "lattice", cuda_median_ms(fwd_bwd, warmup, repeat))
    if dtype == torch.float32:  # the tensor-core tiles take fp32 as tf32 only when torch allows tf32
        allow = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            add("forward", "lattice tf32", cuda_median_ms(fwd, warmup, repeat))
            add("forward+backward", "lattice tf32", cuda_median_ms(fwd_bwd, warmup, repeat))
        finally:
            torch.backends.cuda.matmul.allow_tf32 = allow

    # --- the dispatched path (what the nn modules call) ---------------------------------------------------------
    from lattice.ops import attention_backend, jagged_attention_output

    backend = attention_backend(q, qo_d, causal)
    qd, kd, vd = (t.detach().requires_grad_() for t in (q, k, v))
    disp = lambda: jagged_attention_output(qd, qo_d, kd, vd, ko_d, scale, causal)  # noqa: E731
    add("forward", f"dispatched ({backend})", cuda_median_ms(disp, warmup, repeat))
    add("forward+backward", f"dispatched ({backend})",
        cuda_median_ms(lambda: torch.autograd.grad(disp(), (qd, kd, vd), go), warmup, repeat))

    # --- padded SDPA with a mask -------------------------------------------------------------------------------
    Lq, Lk = int(lq.max()), int(lk.max())
    qp, q_valid = pad(q, qo, Lq)
    kp, k_valid = pad(k, ko, Lk)
    vp, _ = pad(v, ko, Lk)
    gop, _ = pad(go, qo, Lq)
    mask = k_valid[:, None, None, :].expand(B, 1, Lq, Lk)
    if causal:
        i = torch.arange(Lq, device="cuda")[:, None]
        j = torch.arange(Lk, device="cuda")[None, :]
        shift = (lk - lq).cuda()[:, None, None, None]
        mask = mask & (j[None, None] <= i[None, None] + shift)
    qp_, kp_, vp_ = (t.detach().requires_grad_() for t in (qp, kp, vp))
    sdpa = lambda: F.scaled_dot_product_attention(qp_, kp_, vp_, attn_mask=mask, scale=scale)  # noqa: E731
    add("forward", "SDPA padded + mask", cuda_median_ms(sdpa, warmup, repeat))

    def sdpa_fb():
        torch.autograd.grad(sdpa(), (qp_, kp_, vp_), gop)

    add("forward+backward", "SDPA padded + mask", cuda_median_ms(sdpa_fb, warmup, repeat))
    if case == "full":
        sdpa_c = lambda: F.scaled_dot_product_attention(qp_, kp_, vp_, is_causal=True, scale=scale)  # noqa: E731
        add("forward", "SDPA dense is_causal", cuda_median_ms(sdpa_c, warmup, repeat))
        add("forward+backward", "SDPA dense is_causal",
            cuda_median_ms(lambda: torch.autograd.grad(sdpa_c(), (qp_, kp_, vp_), gop), warmup, repeat))

    # --- torch's varlen_attn (FlashAttention on cumulative offsets; fp16/bf16) --------------------------------
    from lattice.ops.attention import varlen_attention_fn

    varlen = varlen_attention_fn()
    if dtype in (torch.float16, torch.bfloat16) and varlen is not None:
        try:
            cq, ck = qo_d.int(), ko_d.int()
            qv, kv, vv = (t.detach().requires_grad_() for t in (q, k, v))
            window = (-1, 0) if causal else (-1, -1)
            va = lambda: varlen(qv, kv, vv, cq, ck, Lq, Lk, scale=scale, window_size=window)  # noqa: E731
            add("forward", "varlen_attn", cuda_median_ms(va, warmup, repeat))
            add("forward+backward", "varlen_attn",
                cuda_median_ms(lambda: torch.autograd.grad(va(), (qv, kv, vv), go), warmup, repeat))
        except Exception as err:  # noqa: BLE001 - optional baseline
            print(f"  (varlen_attn skipped: {type(err).__name__}: {err})", file=sys.stderr)

    # --- FlashAttention-2 varlen (optional) --------------------------------------------------------------------
    if dtype in (torch.float16, torch.bfloat16):
        try:
            from flash_attn import flash_attn_varlen_func

            cq, ck = qo_d.int(), ko_d.int()
            qf, kf, vf = (t.detach().requires_grad_() for t in (q, k, v))
            fa = lambda: flash_attn_varlen_func(qf, kf, vf, cq, ck, Lq, Lk, softmax_scale=scale,  # noqa: E731
                                                causal=causal)
            add("forward", "flash_attn_varlen", cuda_median_ms(fa, warmup, repeat))
            add("forward+backward", "flash_attn_varlen",
                cuda_median_ms(lambda: torch.autograd.grad(fa(), (qf, kf, vf), go), warmup, repeat))
        except Exception as err:  # noqa: BLE001 - optional baseline
            print(f"  (flash_attn skipped: {type(err).__name__}: {err})", file=sys.stderr)
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=["summary", "self-causal", "full"])
    ap.add_argument("--batch", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--heads", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--dims", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--max-len", type=int, default=200)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, 2 repeats (a correctness run of the script)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "bench_attention_cuda.json"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_attention_cuda: no CUDA device; nothing to measure")
        return 0
    import lattice.ops  # noqa: F401  (registers torch.ops.lattice)
    from lattice.ops import has_cuda_kernels

    if not has_cuda_kernels():
        print("bench_attention_cuda: lattice was built without CUDA kernels (LATTICE_FORCE_CUDA=1 pip install ...)")
        return 1
    if args.smoke:
        args.batch, args.heads, args.dims, args.max_len, args.warmup, args.repeat = [16], [2], [32], 40, 1, 2
    results = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for case in args.cases:
            for B in args.batch:
                for H in args.heads:
                    for Dh in args.dims:
                        results += run_case(case, B, H, Dh, args.max_len, dtype, args.warmup, args.repeat)
    print(f"\n{torch.cuda.get_device_name()}  sequence length 0..{args.max_len} (full: {args.max_len})")
    hdr = (f"{'dtype':<9}{'case':<12}{'B':>5}{'H':>3}{'Dh':>4}  {'mode':<17}{'impl':<22}{'median ms':>10}"
           f"{'vs ours':>9}{'GFLOP/s':>9}")
    print(hdr)
    print("-" * len(hdr))
    ours = {}
    key = lambda r: (r["dtype"], r["case"], r["B"], r["H"], r["Dh"], r["mode"])  # noqa: E731
    for r in results:
        if r["impl"] == "lattice":
            ours[key(r)] = r["ms"]
    for r in results:
        base = ours.get(key(r))
        r["ratio_vs_ours"] = r["ms"] / base if base else None
        ratio = f"{r['ratio_vs_ours']:.2f}x" if base else "-"
        print(f"{r['dtype']:<9}{r['case']:<12}{r['B']:>5}{r['H']:>3}{r['Dh']:>4}  {r['mode']:<17}{r['impl']:<22}"
              f"{r['ms']:>10.3f}{ratio:>9}{r['gflops']:>9.0f}")
    # Issue 30's target: the dispatched path >= 0.9x the best of padded SDPA and varlen_attn on every case.
    targets = []
    for k_ in sorted({key(r) for r in results}):
        rows = [r for r in results if key(r) == k_]
        disp = [r for r in rows if r["impl"].startswith("dispatched")]
        base = [r for r in rows if r["impl"] in ("SDPA padded + mask", "varlen_attn")]
        if disp and base:
            best = min(base, key=lambda r: r["ms"])
            targets.append(dict(zip(("dtype", "case", "B", "H", "Dh", "mode"), k_), dispatched=disp[0]["impl"],
                                best_baseline=best["impl"], ratio=best["ms"] / disp[0]["ms"]))
    if targets:
        print("\ndispatched path vs the best of padded SDPA and varlen_attn (their time / dispatched; target >= 0.9):")
        for t in targets:
            flag = "" if t["ratio"] >= 0.9 else "  BELOW TARGET"
            print(f"  {t['dtype']:<9}{t['case']:<12}{t['B']:>5}{t['H']:>3}{t['Dh']:>4}  {t['mode']:<17}"
                  f"{t['dispatched']:<22}{t['ratio']:>6.2f}x vs {t['best_baseline']}{flag}")
    from lattice.ops.attention import varlen_causal_matches

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                       varlen_causal_bottom_right=varlen_causal_matches(str(torch.device("cuda"))),
                       results=results, dispatch_targets=targets), f, indent=1)
    print(f"\nwrote {args.out}  ('vs ours' = their time / ours: > 1 means lattice is faster)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
