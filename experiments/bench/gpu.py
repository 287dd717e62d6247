"""GPU figures on one CUDA device: engine overhead, DP-SGD cost, throughput, sites per GPU.

Without a CUDA device it prints one line saying so, writes {"skipped": reason} and exits 0
(`multimed-fl bench` lists it as skipped). `--device cpu` runs the same code on the CPU: that
is how the tests check this script; its figures are then CPU figures, labelled as such.

Measured side by side in one run (CUDA timings end with torch.cuda.synchronize):
  1. the in-process engine against a plain PyTorch loop doing the same local steps on the
     device (engines.py's reference workload, engine.device=DEVICE)   target <= 1.15x
  2. a DP-SGD step against a plain step on the device, per task and for one step of every
     task (dp_step.py's cases, privacy.grad_sample_mode)              target <= 2.0x
  3. training samples/s (forward, backward, Adam step; batch 32) of the default model (one
     task after another) and of the ResNet-18 image encoder on 3x128x128 images, fp32 and bf16
  4. Ray with engine.gpus_per_site=0.25: the most site processes holding the GPU at once
     (nvidia-smi, sampled), and the run's seconds after start-up against gpus_per_site=1

    python experiments/bench/gpu.py [--quick] [--device cuda|cpu] [--no-ray] [--out results.json]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import dp_step  # the sibling benchmark scripts (this folder is sys.path[0] when run as a script)
import engines
import torch

from federated.app.bench import write_result

ENGINE_TARGET, DP_TARGET = 1.15, 2.0
RESNET_SIDE = 128


def synced(fn: Callable[[], object], device: torch.device) -> Callable[[], None]:
    """fn, then wait for the device: a CUDA call returns before its kernels finish."""

    def run() -> None:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return run


def median_times(cases: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median seconds per case, the cases interleaved so machine load hits them alike."""
    for fn in cases.values():  # warm-up (CUDA context, kernels, allocator)
        fn()
    times: dict[str, list[float]] = {c: [] for c in cases}
    for _ in range(repeats):
        for c, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[c].append(time.perf_counter() - t0)
    return {c: statistics.median(v) for c, v in times.items()}


def engine_overhead(device: torch.device, overrides: list[str], repeats: int) -> dict:
    overrides = [*overrides, f"engine.device={device}"]
    plain, inproc = [], []
    engines.plain_loop(overrides, str(device))  # warm-up: CUDA context, kernels, allocator, corpus cache
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):
            plain.append(engines.plain_loop(overrides, str(device)))
            inproc.append(engines.engine_run("inprocess", overrides, Path(tmp) / f"in{i}")["after_startup_s"])
    p, e = statistics.median(plain), statistics.median(inproc)
    return {"workload": overrides, "plain_s": p, "inprocess_s": e, "ratio": e / p, "target": ENGINE_TARGET}


def dp_overhead(device: torch.device, tasks: int | None, repeats: int) -> dict:
    from federated.core.config import load_config

    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    cfg = load_config(["corpus.samples_per_task_site=60"])
    mode = cfg.privacy.grad_sample_mode
    batches = dp_step.task_batches(cfg, cfg.train.batch_size)
    if tasks:
        batches = {t: batches[t] for t in list(batches)[:tasks]}
    per_task = {}
    for t, b in batches.items():
        cases = {
            "plain": synced(dp_step.make_steps(cfg, t, b, None, device), device),
            "private": synced(dp_step.make_steps(cfg, t, b, mode, device), device),
        }
        per_task[t] = median_times(cases, repeats)
    plain = sum(m["plain"] for m in per_task.values())
    private = sum(m["private"] for m in per_task.values())
    return {
        "mode": mode,
        "batch_size": cfg.train.batch_size,
        "per_task_ms": {t: {c: v * 1e3 for c, v in m.items()} for t, m in per_task.items()},
        "round_plain_ms": plain * 1e3,
        "round_private_ms": private * 1e3,
        "ratio": private / plain,
        "target": DP_TARGET,
    }


def resnet_schema(side: int):
    """One 3-channel image modality of side x side and a 4-class task on it."""
    from federated.core.corpus_schema import CorpusSchema

    return CorpusSchema.from_dict(
        {
            "modalities": [{"name": "photo", "kind": "image", "shape": [3, side, side], "dtype": "float32"}],
            "tasks": [
                {
                    "name": "lesion",
                    "inputs": ["photo"],
                    "target": "multiclass",
                    "metrics": ["macro_f1", "accuracy"],
                    "classes": ["a", "b", "c", "d"],
                    "label_shape": [],
                }
            ],
        }
    )


def random_batch(schema, task: str, n: int, device: torch.device):
    from clients.site_data import TaskSplit

    spec = schema.task(task)
    inputs = {m: torch.randn(n, *schema.modality(m).shape) for m in spec.inputs}
    present = {m: torch.ones(n, dtype=torch.bool) for m in spec.inputs}
    return TaskSplit(inputs, present, torch.randint(len(spec.classes), (n,))).to(device)


def throughput(device: torch.device, repeats: int, batch_size: int = 32, side: int = RESNET_SIDE) -> dict:
    """Training samples/s, fp32 and bf16: the default model stepping through its tasks, and
    ResNet-18 on side x side images."""
    from clients.trainer import task_loss
    from federated.core.compute import autocast
    from federated.core.config import load_config
    from federated.core.models import build_model
    from federated.core.multimed import MULTIMED

    default_cfg = load_config(["corpus.samples_per_task_site=60"])
    real = {t: b.to(device) for t, b in dp_step.task_batches(default_cfg, batch_size).items()}
    cases = {
        "default": (default_cfg.model, MULTIMED, real),
        f"resnet18_{side}px": (
            load_config(["model.name=resnet18"]).model,
            resnet_schema(side),
            {"lesion": random_batch(resnet_schema(side), "lesion", batch_size, device)},
        ),
    }
    out: dict[str, dict] = {}
    for name, (model_cfg, schema, batches) in cases.items():
        model = build_model(model_cfg, schema, 0).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        out[name] = {"parameters": sum(p.numel() for p in model.parameters())}
        for precision in ("fp32", "bf16"):

            def steps(model=model, opt=opt, schema=schema, batches=batches, precision=precision) -> None:
                for task, b in batches.items():
                    opt.zero_grad(set_to_none=True)
                    with autocast(device, precision):
                        loss = task_loss(schema.task(task), model(task, b.inputs, b.present), b.targets)
                    loss.backward()
                    opt.step()

            seconds = median_times({precision: synced(steps, device)}, repeats)[precision]
            out[name][f"{precision}_samples_per_s"] = len(batches) * batch_size / seconds
    return out


def gpu_processes(stop: threading.Event, seen: list[int]) -> None:
    """Sample how many processes hold the GPU (nvidia-smi) until `stop` is set."""
    while not stop.wait(0.5):
        try:
            query = ["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"]
            pids = subprocess.run(query, capture_output=True, text=True, timeout=10).stdout.split()
        except (OSError, subprocess.TimeoutExpired):
            return
        seen.append(len(pids))


def ray_sharing(device: torch.device, overrides: list[str]) -> dict:
    """Sites per GPU under Ray: gpus_per_site 0.25 against 1.0, same workload."""
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        for share in (0.25, 1.0):
            stop, seen = threading.Event(), []
            sampler = threading.Thread(target=gpu_processes, args=(stop, seen), daemon=True)
            sampler.start()
            args = [*overrides, f"engine.device={device}", f"engine.gpus_per_site={share}", "engine.cpus_per_site=1"]
            run = engines.engine_run("ray", args, Path(tmp) / f"ray{share}")
            stop.set()
            sampler.join()
            result[str(share)] = {**run, "max_processes_on_gpu": max(seen, default=0)}
    quarter, whole = result["0.25"], result["1.0"]
    result["speedup_0.25_over_1"] = whole["after_startup_s"] / quarter["after_startup_s"]
    return result


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu to check the script itself")
    p.add_argument("--repeats", type=int, default=3, help="engine runs per side; steps per case are 5x this")
    p.add_argument(
        "--quick", action="store_true", help="smoke scale, 1 engine run, 2 DP tasks, ResNet at 32 px, no Ray"
    )
    p.add_argument("--no-ray", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        reason = "no CUDA device (torch.cuda.is_available() is False)"
        print(f"gpu: skipped: {reason}; the GPU figures need a machine with one")
        write_result({"skipped": reason}, args.out)
        return 0
    import logging

    import flwr.common.logger  # noqa: F401  (configures Flower's logger, which we then quiet)

    logging.getLogger("flwr").setLevel(logging.WARNING)
    overrides = list(engines.REFERENCE)
    if args.quick:
        overrides += ["scale=smoke", "rounds=2"]
        args.repeats, args.no_ray = 1, True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report: dict = {"device": str(device), "device_name": name, "quick": args.quick}
    report["engine"] = engine_overhead(device, overrides, args.repeats)
    report["dp_step"] = dp_overhead(device, 2 if args.quick else None, 5 * args.repeats)
    report["throughput"] = (
        throughput(device, 1, batch_size=4, side=32) if args.quick else throughput(device, 5 * args.repeats)
    )
    report["ray"] = None if args.no_ray or device.type != "cuda" else ray_sharing(device, overrides)
    e, d = report["engine"], report["dp_step"]
    print(f"device {device} ({name})")
    print(f"in-process engine / plain loop   {e['ratio']:.2f}x (target <= {ENGINE_TARGET:g}x)")
    print(f"DP-SGD step / plain step ({d['mode']})   {d['ratio']:.2f}x (target <= {DP_TARGET:g}x)")
    for model, t in report["throughput"].items():
        print(f"{model}: {t['fp32_samples_per_s']:,.0f} samples/s fp32, {t['bf16_samples_per_s']:,.0f} bf16")
    if report["ray"]:
        r = report["ray"]
        print(
            f"Ray, gpus_per_site 0.25: up to {r['0.25']['max_processes_on_gpu']} processes on the GPU, "
            f"{r['speedup_0.25_over_1']:.2f}x faster than one site per GPU"
        )
    write_result(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
