"""Cost of every lattice network at a given size: parameters, analytic FLOPs per sample, and measured
forward / training-step time on batches of the planted synthetic world.

    python benchmarks/bench_models.py                      # the sizes of configs/*.yaml, batch 1024
    python benchmarks/bench_models.py --networks LatticeNetwork InterFormer --threads 2

Sizes come from the shipped configs (``model.network.init_args``): ``LatticeNetwork`` from
configs/quickstart.yaml, ``LatticeNetwork-mdmo`` from configs/mdmo.yaml, every other network from its
own config (configs/interformer.yaml, ...); ``--builtin`` uses the sizes in :data:`QUICKSTART` instead.

Prints a table (medians over ``--steps`` timed steps after ``--warmup``) and writes JSON to ``--out``.
Timings on a shared machine are noisy; the parameter and FLOP counts are exact.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from lattice.data import LatticeDataModule, SyntheticConfig
from lattice.dotted import import_dotted
from lattice.models import DLRM, MMoE, PLE, InterFormer, LatticeNetwork, LogisticRegression, SharedBottom, Wukong

#: The "quickstart" size of each network (what configs/quickstart.yaml-style runs use): small enough to
#: train on the planted world in minutes on 2 CPU cores.
QUICKSTART = {
    "LatticeNetwork": (LatticeNetwork, dict(dim=32, num_layers=2, num_heads=2, fm_tokens=8, lcb_tokens=8, fm_rank=8,
                                            fm_hidden_dims=[128], summary_tokens=2, num_cls=2, num_pma=2,
                                            num_recent=2, representation_dim=128, head_hidden_dims=[64])),
    "InterFormer": (InterFormer, dict(dim=32, num_layers=2, num_heads=2, dot_tokens=8, dcn_tokens=8,
                                      summary_tokens=2, summary_hidden_dims=[128], representation_dim=128,
                                      head_hidden_dims=[64])),
    "SharedBottom": (SharedBottom, dict(dim=16, bottom_dims=[256, 128], head_hidden_dims=[64])),
    "MMoE": (MMoE, dict(dim=16, num_experts=4, expert_dims=[128, 64], head_hidden_dims=[64])),
    "PLE": (PLE, dict(dim=16, num_levels=2, shared_experts=2, task_experts=1, expert_dims=[128, 64],
                      head_hidden_dims=[64])),
    "DLRM": (DLRM, dict(dim=16, bottom_dims=[64], top_dims=[256, 128], head_hidden_dims=[64])),
    "Wukong": (Wukong, dict(dim=32, num_layers=2, fm_tokens=8, lcb_tokens=8, fm_rank=8, fm_hidden_dims=[128],
                            top_dims=[128], head_hidden_dims=[64])),
    "LogisticRegression": (LogisticRegression, dict(dim=32, untie_heads=True)),
}


#: network -> the config whose ``model.network`` it benchmarks
CONFIGS = {
    "LatticeNetwork": "quickstart.yaml",
    "LatticeNetwork-mdmo": "mdmo.yaml",
    "InterFormer": "interformer.yaml",
    "SharedBottom": "shared_bottom.yaml",
    "MMoE": "mmoe.yaml",
    "PLE": "ple.yaml",
    "DLRM": "dlrm.yaml",
    "Wukong": "wukong.yaml",
    "LogisticRegression": "logistic_regression.yaml",
}


def _from_config(name: str, config_dir: str):
    """``(class, init_args)`` of ``model.network`` in the network's config file."""
    import yaml

    with open(os.path.join(config_dir, CONFIGS[name])) as f:
        network = yaml.safe_load(f)["model"]["network"]
    return import_dotted(network["class_path"], "model.network.class_path"), dict(network.get("init_args") or {})


def _batches(batch_size: int, count: int, cache_dir: str | None, rows_scale: float):
    cfg = SyntheticConfig()
    for d in cfg.domains:
        d.rows = max(1, int(d.rows * rows_scale))
    dm = LatticeDataModule(synthetic=cfg, cache_dir=cache_dir, batch_size=batch_size, drop_last=True)
    dm.prepare_data()
    dm.setup("fit")
    out = []
    for b in dm.train_dataloader():
        out.append(b)
        if len(out) == count:
            break
    return dm.schema, out


def mean_tokens(model, batch) -> float:
    """Mean merged sequence tokens per sample of ``batch`` as ``model`` sees them."""
    with torch.no_grad():
        seq = model.processor(batch).sequence
    return 0.0 if seq is None else float(seq.lengths.float().mean())


def _median_ms(fn, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--networks", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--builtin", action="store_true", help="use the built-in QUICKSTART sizes, not configs/")
    p.add_argument("--config-dir", default="configs")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--rows-scale", type=float, default=0.1, help="fraction of the default world's rows to generate")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--out", default=os.path.join("benchmarks", "results", "models.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    schema, batches = _batches(args.batch_size, args.warmup + args.steps, args.cache_dir, args.rows_scale)
    kinds = [t.kind for t in schema.tasks]
    from lattice.metrics import masked_multitask_loss

    rows = []
    for name in args.networks:
        if args.builtin:
            cls, kwargs = QUICKSTART[name.split("-")[0]]
        else:
            cls, kwargs = _from_config(name, args.config_dir)
        kwargs = {**kwargs, "embedding_kwargs": dict(fused_optimizer="rowwise_adagrad", lr=0.05)}
        model = cls(schema, **kwargs)
        # as LatticeModule trains: fused row-wise Adagrad for the embeddings, AdamW for the rest
        opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-3)
        it = iter(range(10**9))

        def forward():
            with torch.no_grad():
                model(batches[next(it) % len(batches)])

        def train_step():
            b = batches[next(it) % len(batches)]
            loss, _ = masked_multitask_loss(model(b).train_logits, b.labels, b.label_mask, kinds)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        model.eval()
        fwd = _median_ms(forward, args.warmup, args.steps)
        model.train()
        step = _median_ms(train_step, args.warmup, args.steps)
        rows.append(
            dict(
                network=name,
                params=model.num_parameters(),
                dense_params=model.num_parameters(include_embeddings=False),
                mflops_per_sample=model.flops_per_sample() / 1e6,
                mflops_per_sample_mean_len=model.flops_per_sample(sequence_length=mean_tokens(model, batches[0])) / 1e6,
                forward_ms=fwd,
                train_step_ms=step,
                train_samples_per_s=args.batch_size / (step / 1e3),
                config=kwargs,
            )
        )
    header = f"{'network':<20}{'params':>10}{'dense':>10}{'MFLOP@maxlen':>13}{'MFLOP@meanlen':>14}{'fwd ms':>9}{'step ms':>9}{'samples/s':>11}"
    print(f"batch {args.batch_size}, {args.threads} threads, median of {args.steps} (FLOPs per sample)")
    print(header)
    for r in rows:
        print(
            f"{r['network']:<20}{r['params']:>10,}{r['dense_params']:>10,}{r['mflops_per_sample']:>13.3f}"
            f"{r['mflops_per_sample_mean_len']:>14.3f}{r['forward_ms']:>9.1f}{r['train_step_ms']:>9.1f}"
            f"{r['train_samples_per_s']:>11.0f}"
        )
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(batch_size=args.batch_size, threads=args.threads, steps=args.steps, results=rows), f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
