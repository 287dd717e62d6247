"""DP-SGD step cost: a private training step against a non-private one, default model, same run.

For every MultiMed task, a batch of `train.batch_size` samples (default 32) from a site that
holds the task; each case runs the same steps interleaved (non-private, then each Opacus
per-sample-gradient mode), so machine load hits them alike. A step is zero_grad + forward +
backward + optimiser step; the private one adds per-sample gradients, clipping and noise
(clients/dp_sgd.private_gradient, the code sites run). Reported per task and for a round
that takes one step of each task (sum of medians), as a ratio to the non-private step.
Target: <= 2.0x for the mode the framework uses (privacy.grad_sample_mode).

    python experiments/bench/dp_step.py [--quick] [--out results.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Sequence

import torch

from clients.dp_sgd import per_sample_loss, per_sample_module, private_gradient
from clients.site_data import SiteData
from federated.app.bench import write_result
from federated.core.config import load_config
from federated.core.models import build_model, group_of
from federated.core.multimed import MULTIMED
from federated.data.cache import prepare_corpus
from federated.data.format import Corpus
from partitions import plan_sites

TARGET = 2.0
CPU = torch.device("cpu")
MODES = ("hooks", "functorch", "ew")


def task_batches(cfg, batch_size: int) -> dict[str, object]:
    corpus = Corpus.open(prepare_corpus(cfg.corpus))
    batches = {}
    for plan in plan_sites(corpus, cfg):
        if plan.role != "train" or all(t in batches for t in plan.tasks):
            continue
        data = SiteData(corpus, plan)
        for t in plan.tasks:
            split = data.split(t, "train")
            if t not in batches and split is not None and len(split) >= batch_size:
                batches[t] = split.take(torch.arange(batch_size))
    return batches


def _model_for(cfg, task: str, device: torch.device):
    model = build_model(cfg.model, MULTIMED, 0).to(device)
    keep = {"fusion", f"head/{task}"} | {f"encoder/{m}" for m in MULTIMED.task(task).inputs}
    for name, p in model.named_parameters():
        p.requires_grad_(group_of(name) in keep)
    model.train()
    return model


def make_steps(cfg, task: str, batch, mode: str | None, device: torch.device = CPU):
    """A closure taking one training step of `task` on `batch`, on `device` (gpu.py times it on CUDA)."""
    from opacus.optimizers import DPOptimizer

    model = _model_for(cfg, task, device)
    batch = batch.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.train.lr)
    if mode is None:

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            per_sample_loss(MULTIMED.task(task), model(task, batch.inputs, batch.present), batch.targets).backward()
            opt.step()

        return step
    gsm = per_sample_module(model, mode)
    dp = DPOptimizer(
        opt,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        expected_batch_size=len(batch),
        generator=torch.Generator(device=device).manual_seed(0),
    )

    def private_step() -> None:
        private_gradient(gsm, dp, MULTIMED.task(task), batch)
        dp.original_optimizer.step()

    return private_step


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=15, help="interleaved steps per case; median reported")
    p.add_argument("--quick", action="store_true", help="3 repeats, 3 tasks: a smoke run for tests")
    p.add_argument("--out", default=None, help="also write the results as JSON to this path")
    p.add_argument("overrides", nargs="*", help="config overrides (key=value)")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats = 3
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)  # as sites run (engine.torch_threads)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    cfg = load_config(["corpus.samples_per_task_site=60", *args.overrides])
    batches = task_batches(cfg, cfg.train.batch_size)
    if args.quick:
        batches = {t: batches[t] for t in list(batches)[:3]}
    cases = {
        t: {"non_private": make_steps(cfg, t, b, None), **{m: make_steps(cfg, t, b, m) for m in MODES}}
        for t, b in batches.items()
    }
    times = {t: {c: [] for c in cs} for t, cs in cases.items()}
    for cs in cases.values():
        for fn in cs.values():  # warm-up
            fn()
    for _ in range(args.repeats):
        for t, cs in cases.items():
            for c, fn in cs.items():
                t0 = time.perf_counter()
                fn()
                times[t][c].append(time.perf_counter() - t0)
    med = {t: {c: statistics.median(v) for c, v in cs.items()} for t, cs in times.items()}
    per_task = {t: {c: {"median_s": m[c], "ratio": m[c] / m["non_private"]} for c in m} for t, m in med.items()}
    round_total = {c: sum(m[c] for m in med.values()) for c in ("non_private", *MODES)}
    ratios = {c: round_total[c] / round_total["non_private"] for c in MODES}
    chosen = cfg.privacy.grad_sample_mode
    report = {
        "config": {
            "batch_size": cfg.train.batch_size,
            "repeats": args.repeats,
            "tasks": list(batches),
            "model_parameters": sum(p.numel() for p in build_model(cfg.model, MULTIMED, 0).parameters()),
            "quick": args.quick,
        },
        "per_task": per_task,
        "round_seconds": round_total,
        "round_ratio": ratios,
        "target": {
            "mode": chosen,
            "max_ratio": TARGET,
            "ratio": ratios.get(chosen),
            "met": ratios.get(chosen, float("inf")) <= TARGET,
        },
    }
    print(f"batch {cfg.train.batch_size}, median of {args.repeats} interleaved steps, 1 torch thread")
    print(f"{'task':<30}{'plain ms':>10}" + "".join(f"{m + ' x':>14}" for m in MODES))
    for t, m in med.items():
        print(f"{t:<30}{m['non_private'] * 1e3:>10.1f}" + "".join(f"{m[c] / m['non_private']:>14.2f}" for c in MODES))
    print(
        f"{'one step of every task':<30}{round_total['non_private'] * 1e3:>10.1f}"
        + "".join(f"{ratios[c]:>14.2f}" for c in MODES)
    )
    verdict = "met" if report["target"]["met"] else "NOT met"
    print(f"target {chosen} <= {TARGET:g}x non-private: {verdict} ({ratios.get(chosen, float('nan')):.2f}x)")
    write_result(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
