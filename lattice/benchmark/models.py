"""Cost of every lattice network at a given size: parameters, analytic FLOPs per sample, and measured forward /
training-step time on batches of the planted synthetic world (benchmarks/bench_models.py)."""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

import torch

from lattice.benchmark.timing import timeit
from lattice.data import LatticeDataModule, SyntheticConfig
from lattice.dotted import import_dotted
from lattice.metrics import masked_multitask_loss
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


def network_from_config(name: str, config_dir: str):
    """``(class, init_args)`` of ``model.network`` in the network's config file."""
    import yaml

    with open(os.path.join(config_dir, CONFIGS[name])) as f:
        network = yaml.safe_load(f)["model"]["network"]
    return import_dotted(network["class_path"], "model.network.class_path"), dict(network.get("init_args") or {})


def planted_batches(batch_size: int, count: int, cache_dir: Optional[str], rows_scale: float):
    """``(schema, batches)``: the first ``count`` training batches of the default planted world, its domains
    scaled to ``rows_scale`` of their rows."""
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


def measure_network(name: str, cls: type, kwargs: Dict[str, Any], schema, batches: List[Any], warmup: int,
                    steps: int) -> Dict[str, Any]:
    """Parameters, FLOPs per sample (at the longest sequences and at ``batches[0]``'s mean length) and the
    median forward and training-step milliseconds of ``cls(schema, **kwargs)`` over ``batches``, trained as
    LatticeModule trains it: fused row-wise Adagrad for the embeddings, AdamW for the rest."""
    kinds = [t.kind for t in schema.tasks]
    kwargs = {**kwargs, "embedding_kwargs": dict(fused_optimizer="rowwise_adagrad", lr=0.05)}
    model = cls(schema, **kwargs)
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
    fwd = 1e3 * timeit(forward, steps, warmup)["median_s"]
    model.train()
    step = 1e3 * timeit(train_step, steps, warmup)["median_s"]
    batch_size = batches[0].batch_size
    return dict(
        network=name,
        params=model.num_parameters(),
        dense_params=model.num_parameters(include_embeddings=False),
        mflops_per_sample=model.flops_per_sample() / 1e6,
        mflops_per_sample_mean_len=model.flops_per_sample(sequence_length=mean_tokens(model, batches[0])) / 1e6,
        forward_ms=fwd,
        train_step_ms=step,
        train_samples_per_s=batch_size / (step / 1e3),
        config=kwargs,
    )
