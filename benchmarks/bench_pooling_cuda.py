"""GPU benchmark of the CUDA jagged embedding pooling kernels (run by benchmarks/gpu_check.sh).

Workload (as the CPU benchmark): T tables of R rows, D columns, batch B, bag lengths uniform in [1, L]. Modes:
forward; forward + sparse backward (unique rows and their gradients); a training step with the optimizer fused
into backward (row-wise Adagrad). Baselines measured in the same run: one ``F.embedding_bag`` call over the
concatenated table, a Python loop of per-table ``nn.EmbeddingBag``, ``F.embedding_bag(sparse=True)`` + torch's
sparse Adagrad step, and FBGEMM's GPU TBE when ``fbgemm_gpu`` is importable. Prints medians (CUDA events), ratios
against ours and effective GB/s (row bytes gathered / time); writes JSON (``--out``). Each configuration is first
checked against torch on its own tensors (``lattice.benchmark.pool_agreement``: forward, sparse backward, fused
row-wise Adagrad step); a disagreement is printed and makes the exit status 1.
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
from lattice.benchmark.pool_agreement import check_pooling_agreement, describe  # noqa: E402


def make_batch(T, R, D, B, L, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, L + 1, (T * B,), generator=g)
    offsets = torch.zeros(T * B + 1, dtype=torch.int64)
    offsets[1:] = lengths.cumsum(0)
    indices = torch.randint(0, R, (int(offsets[-1]),), generator=g)
    tro = torch.arange(T + 1, dtype=torch.int64) * R
    weights = (torch.randn(T * R, D, generator=g) * 0.01).to(dtype)
    table = torch.repeat_interleave(torch.arange(T * B), lengths) // B
    return dict(weights=weights.cuda(), tro=tro.cuda(), indices=indices.cuda(), offsets=offsets.cuda(),
                global_indices=(indices + tro[table]).cuda(), lengths=lengths)


def run_case(T, R, D, B, L, dtype, warmup, repeat):
    ops = torch.ops.lattice
    c = make_batch(T, R, D, B, L, dtype)
    n = c["indices"].numel()
    gathered_bytes = n * D * c["weights"].element_size()
    go = torch.randn(B, T, D, device="cuda", dtype=dtype)
    agreement = check_pooling_agreement(c["weights"], c["tro"], c["indices"], c["offsets"], c["global_indices"], go)
    agreement.update(T=T, R=R, D=D, B=B, L=L, dtype=str(dtype).replace("torch.", ""))
    print(f"{agreement['dtype']} rows={R:,} D={D}: {describe(agreement)}")
    results = []

    def add(mode, impl, ms, moved=gathered_bytes):
        results.append(dict(mode=mode, impl=impl, ms=ms, gbps=moved / ms / 1e6, T=T, R=R, D=D, B=B, L=L,
                            dtype=str(dtype).replace("torch.", "")))

    # --- forward ---------------------------------------------------------------------------------------------
    fwd = lambda: ops.jagged_embedding_pool(c["weights"], c["tro"], c["indices"], c["offsets"], 0, None)  # noqa: E731
    add("forward", "lattice", cuda_median_ms(fwd, warmup, repeat))
    eb = lambda: F.embedding_bag(c["global_indices"], c["weights"], c["offsets"][:-1], mode="sum")  # noqa: E731
    add("forward", "F.embedding_bag (one call)", cuda_median_ms(eb, warmup, repeat))
    bags = [torch.nn.EmbeddingBag(R, D, mode="sum").cuda().to(dtype) for _ in range(T)]
    for t, bag in enumerate(bags):
        bag.weight.data.copy_(c["weights"][t * R:(t + 1) * R])
    per_table = []
    off = c["offsets"].cpu()
    for t in range(T):
        lo, hi = int(off[t * B]), int(off[(t + 1) * B])
        per_table.append((c["indices"][lo:hi], (off[t * B:(t + 1) * B] - lo).cuda()))
    loop = lambda: torch.stack([bags[t](i, o) for t, (i, o) in enumerate(per_table)], 1)  # noqa: E731
    add("forward", "nn.EmbeddingBag loop", cuda_median_ms(loop, warmup, repeat))

    # --- forward + sparse backward -----------------------------------------------------------------------------
    def ours_fb():
        fwd()
        return ops.jagged_embedding_pool_backward_sparse(go, c["tro"], c["indices"], c["offsets"], 0, None)

    add("forward+backward", "lattice (sparse rows)", cuda_median_ms(ours_fb, warmup, repeat), 2 * gathered_bytes)
    w_leaf = c["weights"].clone().requires_grad_(True)

    def torch_fb():
        out = F.embedding_bag(c["global_indices"], w_leaf, c["offsets"][:-1], mode="sum", sparse=True)
        out.view(T, B, D).transpose(0, 1).backward(go)
        w_leaf.grad = None

    add("forward+backward", "F.embedding_bag(sparse=True)", cuda_median_ms(torch_fb, warmup, repeat), 2 * gathered_bytes)

    # --- training step, fused row-wise Adagrad -----------------------------------------------------------------
    w = c["weights"].clone()
    state = torch.zeros(w.shape[0], device="cuda")

    def ours_step():
        ops.jagged_embedding_pool(w, c["tro"], c["indices"], c["offsets"], 0, None)
        ops.jagged_embedding_pool_backward_fused_(w, state, go, c["tro"], c["indices"], c["offsets"], 0, None, 1,
                                                  0.01, 1e-8, 0.0)

    add("train step", "lattice (fused row-wise Adagrad)", cuda_median_ms(ours_step, warmup, repeat), 2 * gathered_bytes)
    if dtype == torch.float32:
        p = torch.nn.Parameter(c["weights"].clone())
        opt = torch.optim.Adagrad([p], lr=0.01)

        def torch_step():
            out = F.embedding_bag(c["global_indices"], p, c["offsets"][:-1], mode="sum", sparse=True)
            out.view(T, B, D).transpose(0, 1).backward(go)
            opt.step()
            opt.zero_grad(set_to_none=True)

        add("train step", "F.embedding_bag + torch sparse Adagrad", cuda_median_ms(torch_step, warmup, repeat),
            2 * gathered_bytes)
    try:  # FBGEMM GPU TBE with exact row-wise Adagrad, when installed
        from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
            ComputeDevice, EmbeddingLocation, OptimType, SplitTableBatchedEmbeddingBagsCodegen)

        if dtype == torch.float32:
            tbe = SplitTableBatchedEmbeddingBagsCodegen(
                [(R, D, EmbeddingLocation.DEVICE, ComputeDevice.CUDA)] * T,
                optimizer=OptimType.EXACT_ROWWISE_ADAGRAD, learning_rate=0.01, eps=1e-8).cuda()
            go_flat = go.reshape(B, T * D)

            def fbgemm_step():
                tbe(c["indices"], c["offsets"]).backward(go_flat)

            add("train step", "FBGEMM TBE row-wise Adagrad", cuda_median_ms(fbgemm_step, warmup, repeat), 2 * gathered_bytes)
            add("forward", "FBGEMM TBE", cuda_median_ms(lambda: tbe(c["indices"], c["offsets"]), warmup, repeat))
    except Exception as err:  # noqa: BLE001 - optional baseline
        print(f"  (FBGEMM TBE skipped: {type(err).__name__}: {err})", file=sys.stderr)
    return results, agreement


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tables", type=int, default=26)
    ap.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--batch", type=int, default=2048)
    ap.add_argument("--max-len", type=int, default=40)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, 2 repeats (a correctness run of the script)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "bench_pooling_cuda.json"))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_pooling_cuda: no CUDA device; nothing to measure")
        return 0
    import lattice.ops  # noqa: F401  (registers torch.ops.lattice)
    from lattice.ops import has_cuda_kernels

    if not has_cuda_kernels():
        print("bench_pooling_cuda: lattice was built without CUDA kernels (LATTICE_FORCE_CUDA=1 pip install ...)")
        return 1
    if args.smoke:
        args.rows, args.dims, args.batch, args.tables, args.warmup, args.repeat = [1000], [64], 64, 4, 1, 2
    results, agreements = [], []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for R in args.rows:
            for D in args.dims:
                case_results, agreement = run_case(args.tables, R, D, args.batch, args.max_len, dtype, args.warmup,
                                                   args.repeat)
                results += case_results
                agreements.append(agreement)
    print(f"\n{torch.cuda.get_device_name()}  T={args.tables} B={args.batch} bag length 1..{args.max_len}")
    hdr = f"{'dtype':<9}{'rows':>9}{'D':>5}  {'mode':<17}{'impl':<42}{'median ms':>10}{'vs ours':>9}{'GB/s':>8}"
    print(hdr)
    print("-" * len(hdr))
    ours = {}
    for r in results:
        if r["impl"].startswith("lattice"):
            ours[(r["dtype"], r["R"], r["D"], r["mode"])] = r["ms"]
    for r in results:
        base = ours.get((r["dtype"], r["R"], r["D"], r["mode"]))
        r["ratio_vs_ours"] = r["ms"] / base if base else None
        ratio = f"{r['ratio_vs_ours']:.2f}x" if base else "-"
        print(f"{r['dtype']:<9}{r['R']:>9}{r['D']:>5}  {r['mode']:<17}{r['impl']:<42}{r['ms']:>10.3f}{ratio:>9}"
              f"{r['gbps']:>8.0f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), results=results, agreement=agreements), f, indent=1)
    print(f"\nwrote {args.out}  ('vs ours' = their time / ours: > 1 means lattice is faster)")
    if not all(a["ok"] for a in agreements):
        print("lattice's CUDA kernels DISAGREE with torch on at least one configuration (see 'agreement' above)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
