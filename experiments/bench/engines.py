"""Engine overhead: the federation engines against a plain PyTorch loop doing the same work.

Reference workload: the default model, the 8 training sites of the default plan (no held-out
site), 5 rounds of `train.max_steps_per_round` local steps per site, then the sites'
evaluation, every round. The plain loop does exactly that with the project's trainer and
no framework: load the global weights, train, average (FedAvg, weighted by examples),
evaluate. Measured side by side in one run, interleaved (plain, in-process, plain, ...):
  in-process engine / plain loop          target <= 1.15
  Ray engine after start-up / plain loop  target <= 2.0 (start-up reported separately)
"After start-up" is from the handshake's end to the last round's end (callback timestamps);
start-up is everything before (Ray: starting Ray and the actors, importing torch in each).
Scale (--scale-sites): the in-process engine with N sites of a small model, 3 rounds:
seconds per round and peak resident memory.

    python experiments/bench/engines.py [--quick] [--no-ray] [--scale-sites 1000] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from federated.app.bench import write_result
from federated.core.config.schema import ExperimentConfig
from federated.server.callbacks import Callback
from federated.server.evaluation import SiteProfile
from federated.server.records import FederationResult, RoundRecord

REFERENCE = ["sites.held_out=[]", "rounds=5", "train.max_steps_per_round=10", "corpus.samples_per_task_site=100"]


class Stopwatch(Callback):
    """Callback: when the federation started (after the handshake) and ended."""

    def __init__(self) -> None:
        self.start = self.end = 0.0

    def on_start(self, cfg: ExperimentConfig, profiles: list[SiteProfile]) -> None:
        self.start = time.perf_counter()

    def on_round_end(self, record: RoundRecord) -> None:
        self.end = time.perf_counter()

    def on_end(self, result: FederationResult) -> None:
        self.end = time.perf_counter()


def plain_loop(overrides: list[str], device: str = "cpu") -> float:
    """The same rounds with no framework, on `device`: seconds from the first round to the last."""
    from clients.site_data import SiteData
    from clients.trainer import evaluate_site, train_local
    from federated.core.config import load_config
    from federated.core.models import build_model
    from federated.data.cache import prepare_corpus
    from federated.data.format import Corpus
    from partitions import plan_sites

    cfg = load_config(overrides)
    corpus = Corpus.open(prepare_corpus(cfg.corpus))
    initial = build_model(cfg.model, corpus.schema, cfg.seed)
    sites = [
        (p, SiteData(corpus, p), build_model(cfg.model, corpus.schema, cfg.seed).to(device))
        for p in plan_sites(corpus, cfg)
    ]
    global_state = {k: v.clone().to(device) for k, v in initial.state_dict().items()}
    t0 = time.perf_counter()
    for _, data, model in sites:  # round 0 evaluation, as the engines do
        model.load_state_dict(global_state)
        evaluate_site(model, data)
    for rnd in range(1, cfg.rounds + 1):
        states, weights = [], []
        for i, (_plan, data, model) in enumerate(sites):
            model.load_state_dict(global_state)
            result = train_local(model, data, cfg.train, seed=1000 * rnd + i)  # ends with a host read
            states.append({k: v.detach().clone() for k, v in initial.state_dict().items()})
            weights.append(result.num_examples)
        w = np.asarray(weights, dtype=np.float64) / sum(weights)
        global_state = {k: sum(float(wi) * s[k] for wi, s in zip(w, states, strict=True)) for k in global_state}
        for _, data, model in sites:
            model.load_state_dict(global_state)
            evaluate_site(model, data)
    return time.perf_counter() - t0


def engine_run(engine: str, overrides: list[str], out: Path) -> dict[str, float]:
    from federated.core.config import load_config
    from federated.data.cache import prepare_corpus
    from federated.data.format import Corpus
    from federated.engines import ENGINES
    from partitions import plan_sites

    cfg = load_config([*overrides, f"engine={engine}"])
    corpus_path = prepare_corpus(cfg.corpus)
    n = len(plan_sites(Corpus.open(corpus_path), cfg))
    watch = Stopwatch()
    t0 = time.perf_counter()
    ENGINES.get(engine)(cfg, corpus_path, n, [watch], out_dir=out)
    t1 = time.perf_counter()
    return {"wall_s": t1 - t0, "startup_s": watch.start - t0, "after_startup_s": watch.end - watch.start}


def scale_run(n_sites: int) -> dict[str, float]:
    """In a fresh process: N sites of a small model, 3 rounds; per-round seconds, peak RSS."""
    code = f"""
import json, logging, resource, time
import flwr.common.logger
logging.getLogger("flwr").setLevel(logging.WARNING)
from federated.core.config import load_config
from federated.data.cache import prepare_corpus
from federated.data.format import Corpus
from federated.engines import ENGINES
from federated.server.callbacks import Callback
from partitions import plan_sites
cfg = load_config(["sites.planner=random_mix", "sites.n_sites={n_sites}", "sites.tasks_per_site=2",
                   "sites.holdout=random", "sites.holdout_k={max(1, n_sites // 20)}", "sites.min_samples=2",
                   "model.dim=16", "model.tokens_per_modality=1", "model.heads=2", "rounds=3",
                   "train.max_steps_per_round=2", "train.batch_size=8", "corpus.samples_per_task_site=200",
                   "strategy.min_train_sites=1"])
path = prepare_corpus(cfg.corpus)
n = len(plan_sites(Corpus.open(path), cfg))
rounds = []
class W(Callback):
    def on_start(self, *a): self.t = time.perf_counter()
    def on_round_end(self, r):
        now = time.perf_counter(); rounds.append(now - self.t); self.t = now
ENGINES.get("inprocess")(cfg, path, n, [W()])
peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({{"sites": n, "round_s": rounds, "peak_rss_mb": peak_mb}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="smoke scale, 1 repeat, 2 rounds, no Ray, 20-site scale run")
    p.add_argument("--no-ray", action="store_true")
    p.add_argument("--scale-sites", type=int, default=1000, help="0 skips the scale run")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    import logging

    import flwr.common.logger  # noqa: F401  (configures Flower's logger, which we then quiet)

    logging.getLogger("flwr").setLevel(logging.WARNING)
    overrides = list(REFERENCE)
    if args.quick:
        overrides += ["scale=smoke", "rounds=2"]
        args.repeats, args.no_ray, args.scale_sites = 1, True, min(args.scale_sites, 20) if args.scale_sites else 0
    import tempfile

    results: dict[str, list[float]] = {"plain": [], "inprocess": [], "inprocess_wall": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            results["plain"].append(plain_loop(overrides))
            r = engine_run("inprocess", overrides, Path(tmp) / f"in{i}")
            results["inprocess"].append(r["after_startup_s"])
            results["inprocess_wall"].append(r["wall_s"])
        ray = None
        if not args.no_ray:
            ray = engine_run("ray", overrides, Path(tmp) / "ray")
            results["plain_ray_pair"] = [plain_loop(overrides)]
    med = {k: statistics.median(v) for k, v in results.items() if v}
    report = {
        "workload": overrides,
        "repeats": args.repeats,
        "medians_s": med,
        "times_s": results,
        "inprocess_ratio": med["inprocess"] / med["plain"],
        "inprocess_target": 1.15,
        "ray": ray,
        "ray_ratio": (ray["after_startup_s"] / med.get("plain_ray_pair", med["plain"])) if ray else None,
        "ray_target": 2.0,
        "scale": scale_run(args.scale_sites) if args.scale_sites else None,
    }
    print(f"reference workload: {' '.join(overrides)}; median of {args.repeats}")
    print(f"plain PyTorch loop      {med['plain']:8.2f} s")
    print(
        f"in-process engine       {med['inprocess']:8.2f} s  ratio {report['inprocess_ratio']:.2f} "
        f"(target <= 1.15); wall with start-up {med['inprocess_wall']:.2f} s"
    )
    if ray:
        print(
            f"Ray engine after start  {ray['after_startup_s']:8.2f} s  ratio {report['ray_ratio']:.2f} "
            f"(target <= 2.0); start-up {ray['startup_s']:.1f} s, wall {ray['wall_s']:.1f} s"
        )
    if report["scale"]:
        s = report["scale"]
        print(
            f"scale: {s['sites']} sites in-process, small model: "
            f"{', '.join(f'{x:.1f}' for x in s['round_s'])} s per round (round 0 = evaluation only), "
            f"peak RSS {s['peak_rss_mb']:.0f} MB"
        )
    write_result(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
