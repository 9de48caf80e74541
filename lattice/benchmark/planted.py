"""How much of bench_quality's LR -> oracle AUC gap can a model learn from a planted world's training rows?

The planted truth of every (domain, task) is ``z = <A_d u, P_t v> / sqrt(k) * affinity + (bias, context,
sequence terms)``. :func:`ceilings` regenerates rows of the configured world with the generator's own code
(statistically the benchmark's rows: the same domains, row counts of its time split, users, items and truth)
and scores, against labels drawn from the truth exactly as the generator draws them:

1. ``oracle``: the truth itself;
2. ablations: the truth without the user x item affinity term, with the time-averaged user factor instead
   of the drifted one, and without each planted term that is linear in its task's coefficient (the
   generator's own per-row values: user bias, item popularity, history same-cluster share, re-engagement,
   position, brand, hour, device, activity, price, query match): how much of the oracle's AUC each carries;
3. two *generous* learnability ceilings: everything planted is given exactly (maps ``A_d``, ``P_t``, biases,
   context and sequence effects, intercepts) except
   - ``user factors estimated``: each user's 8 latent factors, estimated (MAP under the true Gaussian prior,
     centred on 0.7 x the centre of the user's observable segment) from the user's training-period rows;
   - ``user and item factors estimated``: the same, plus every item's factors (prior centred on the true
     centre of its observable cluster), estimated jointly.
   A network has to learn everything else as well, so these bound what it can be expected to reach.

benchmarks/quality_ceiling.py is its command line.
"""
from __future__ import annotations

import math
from typing import Dict, List

import numpy as np
import torch

from lattice.data.synthetic import SyntheticConfig, SyntheticWorld
from lattice.metrics import binary_auc


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def load_config(path: str) -> SyntheticConfig:
    import yaml

    with open(path) as f:
        return SyntheticConfig.from_dict(yaml.safe_load(f)["data"]["synthetic"])


def draw(world: SyntheticWorld, di: int, n: int, lo: float, hi: float, seed: int):
    """``n`` rows of domain ``di`` with times uniform in ``[lo, hi]`` of the span: users, items, per task
    (task, offset = z without the affinity term, affinity map M: z = offset + u . (v @ M)), labels, truth."""
    cfg, p, k = world.config, world.params(), world.config.latent_dim
    out = world.sample(cfg.domains[di].name, n, seed=seed, start=lo, end=hi, stream=10_000 + seed)
    cols, z, tau, rng = out["cols"], out["z"], out["tau"], out["rng"]
    users, items = cols["users"], cols["items"]
    u_now = p["u"][users] + cfg.drift * tau[:, None] * p["user_drift"][users]
    dom = cfg.domains[di]
    A = p["domains"][di]["A"]
    tasks = [t for t in cfg.tasks if t.kind == "binary" and (dom.tasks is None or t.name in dom.tasks)]
    recs, labels, truth = [], {}, {}
    for t in tasks:
        M = p["tasks"][cfg.tasks.index(t)]["P"].T @ A * (t.affinity / math.sqrt(k))
        aff = (u_now * (p["v"][items] @ M)).sum(1)
        recs.append((t, z[t.name] - aff, M))
        q = sigmoid(z[t.name])
        y = rng.random(n) < q
        if t.parent:
            y &= labels[t.parent]
            truth[t.name] = truth[t.parent] * q
        else:
            truth[t.name] = q
        labels[t.name] = y
    extra = dict(cols=cols, tau=tau, u_now=u_now, terms=out["terms"])
    return users, items, recs, labels, truth, extra


def fit_factors(world, train, estimate_items: bool, iters: int = 4):
    """MAP user (and item) factors from the training rows; everything else is the truth."""
    p, cfg = world.params(), world.config
    centers = torch.tensor(p["centers"])
    u0 = 0.7 * centers[torch.tensor(np.argmax(p["interest"], 1))]
    v0 = centers[torch.tensor(p["item_cluster"])] if estimate_items else torch.tensor(p["v"])
    u = u0.clone().requires_grad_(True)
    v = v0.clone().requires_grad_(estimate_items)
    params = [u, v] if estimate_items else [u]
    data = [(torch.tensor(us), torch.tensor(it), [(t, torch.tensor(off), torch.tensor(M)) for t, off, M in recs],
             {n: torch.tensor(y, dtype=torch.float64) for n, y in lab.items()}) for us, it, recs, lab, _, _ in train]
    opt = torch.optim.LBFGS(params, lr=1, max_iter=300, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = ((u - u0) ** 2).sum() / (2 * max(cfg.user_spread, 1e-3) ** 2)
        if estimate_items:
            loss = loss + ((v - v0) ** 2).sum() / (2 * max(cfg.item_spread, 1e-3) ** 2)
        for us, it, recs, lab in data:
            for t, off, M in recs:
                logit = off + (u[us] * (v[it] @ M)).sum(1)
                weight = lab[t.parent] if t.parent else torch.ones_like(logit)  # a child is observed after its parent
                loss = loss + (weight * torch.nn.functional.binary_cross_entropy_with_logits(
                    logit, lab[t.name], reduction="none")).sum()
        loss.backward()
        return loss

    for _ in range(iters):
        opt.step(closure)
    return u.detach().numpy(), v.detach().numpy()


def ceilings(world: SyntheticWorld, train_fraction: float, test_rows: int) -> Dict[str, List[float]]:
    """AUC per (domain, task) of the oracle, of each ablation and of the two learnability ceilings (see the
    module docstring), on ``test_rows`` rows per domain from the last 10 % of the span; the factors are
    estimated from each domain's rows in the first ``train_fraction`` of it."""
    cfg = world.config
    p = world.params()
    train = [draw(world, di, int(round(d.rows * train_fraction)), 0.0, train_fraction, 1)
             for di, d in enumerate(cfg.domains)]
    test = [draw(world, di, test_rows, 0.9, 1.0, 2) for di in range(len(cfg.domains))]

    def score(logit_fn):
        out = []
        for di, (us, it, recs, lab, _, extra) in enumerate(test):
            probs = {}
            for t, off, M in recs:
                q = sigmoid(logit_fn(di, t, off, M, us, it, extra))
                probs[t.name] = probs[t.parent] * q if t.parent else q
            out += [binary_auc(probs[t.name], lab[t.name]) for t, _, _ in recs]
        return out

    def aff(u, it, M):
        return (u * (p["v"][it] @ M)).sum(1)

    tau_train = train_fraction / 2
    rows = {
        "oracle": score(lambda di, t, off, M, us, it, x: off + aff(x["u_now"], it, M)),
        "no affinity term": score(lambda di, t, off, M, us, it, x: off),
        "time-averaged user factor": score(lambda di, t, off, M, us, it, x: off + aff(
            p["u"][us] + cfg.drift * tau_train * p["user_drift"][us], it, M)),
    }
    for name in test[0][5]["terms"]:
        label = "re-engagement" if name == "repeat" else name
        rows[f"no {label} term"] = score(lambda di, t, off, M, us, it, x, name=name: off + aff(x["u_now"], it, M)
                                         - getattr(t, name) * x["terms"][name])
    for name, items in [("user factors estimated", False), ("user and item factors estimated", True)]:
        U, V = fit_factors(world, train, items)
        rows[name] = score(lambda di, t, off, M, us, it, x: off + (U[us] * (V[it] @ M)).sum(1))
    return rows
