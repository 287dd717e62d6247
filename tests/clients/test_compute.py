"""engine.device and train.precision: where a site's tensors live and the precision it trains in.

This machine has no GPU, so placement is checked on `meta`, PyTorch's device without data: a
training round runs there step by step (every batch, activation, gradient and optimiser-state
tensor is a meta tensor) and fails only where a value is read back to the host. CUDA-only
assertions are skipped with the reason when no CUDA device is present.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re

import pytest
import torch
from flwr.app import ArrayRecord, Context, RecordDict
from opacus.optimizers import DPOptimizer

import clients.site_runtime as site_runtime
from clients.dp_sgd import per_sample_loss, per_sample_module, private_gradient
from clients.site_data import SiteData
from clients.trainer import evaluate_site, make_optimizer, scaled_step, train_local
from federated.app.cli import main
from federated.core.compute import DeviceError, autocast, resolve_device
from federated.core.config import ConfigError, config_to_yaml, load_config
from federated.core.models import build_model, group_of
from federated.core.protocol import CONFIG_KEY, CORPUS_KEY, DEVICE_KEY
from federated.data.format import Corpus
from partitions import plan_sites
from strategies.scaffold import CONTROL_STATE, SiteControl

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="asserts the refusal on a machine without CUDA")
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; this machine has none")
META = torch.device("meta")
NO_DATA = "Cannot copy out of meta tensor"  # the host read a meta tensor refuses


@pytest.fixture(scope="module")
def site(smoke_corpus):
    cfg = load_config(["scale=smoke", "engine.device=cpu"])
    corpus = Corpus.open(smoke_corpus)
    plan = next(p for p in plan_sites(corpus, cfg) if p.role == "train" and len(p.tasks) > 1)
    return cfg, SiteData(corpus, plan)


# --- the settings --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["engine.device=gpu"], "engine.device must be one of: auto, cpu, cuda, cuda:N, mps"),
        (["engine.device=cuda:x"], "engine.device must be one of"),
        (["train.precision=fp8"], "train.precision must be one of: fp32, bf16, fp16"),
        (["privacy=dp_sgd", "train.precision=fp16"], "train.precision cannot be fp16 with privacy=dp_sgd"),
        (["privacy=dp_sgd", "train.precision=bf16"], "train.precision cannot be bf16 with privacy.grad_sample_mode=ew"),
        (["engine=ray", "engine.device=cuda"], "engine.gpus_per_site must be > 0 with engine=ray"),
    ],
)
def test_settings_that_cannot_work_are_refused_by_name(overrides, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(overrides)


def test_settings_that_work_are_accepted():
    assert load_config([]).engine.device == "auto" and load_config([]).train.precision == "fp32"
    for overrides in (
        ["engine.device=cuda:3", "train.precision=fp16"],
        ["engine.device=mps"],
        ["privacy=dp_sgd", "train.precision=bf16", "privacy.grad_sample_mode=hooks"],
        ["privacy=dp_sgd", "train.precision=bf16", "privacy.grad_sample_mode=functorch"],
        ["engine=ray", "engine.device=cuda", "engine.gpus_per_site=0.25"],
    ):
        load_config(overrides)


def test_auto_is_cuda_when_present_else_cpu():
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(DeviceError, match="engine.device must be one of"):
        resolve_device("tpu")


@NO_CUDA
def test_a_cuda_device_this_machine_lacks_is_refused_before_the_run_writes_anything(tmp_path, capsys):
    with pytest.raises(DeviceError, match="engine.device=cuda:1: this machine has no CUDA device"):
        resolve_device("cuda:1")
    out = tmp_path / "run"
    assert main(["run", "--out", str(out), "scale=smoke", "engine.device=cuda"]) == 2
    assert "engine.device=cuda: this machine has no CUDA device" in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


@CUDA
def test_a_cuda_index_past_the_last_device_is_refused():
    n = torch.cuda.device_count()
    with pytest.raises(DeviceError, match=f"has {n} CUDA device"):
        resolve_device(f"cuda:{n}")


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="asserts the refusal on a machine without MPS")
def test_mps_on_a_machine_without_it_is_refused():
    with pytest.raises(DeviceError, match="no Apple MPS device"):
        resolve_device("mps")


# --- placement -----------------------------------------------------------------------------


def _record_input_devices(model: torch.nn.Module) -> list[set[torch.device]]:
    """Per forward call: the devices of its inputs and presence masks."""
    calls: list[set[torch.device]] = []

    def hook(module, args):
        _task, inputs, present = args
        calls.append({t.device for t in [*inputs.values(), *present.values()]})

    model.register_forward_pre_hook(hook)
    return calls


def test_training_keeps_model_batches_and_optimiser_state_on_the_device(site, monkeypatch):
    """On meta every step runs (a host tensor in a step would fail or leave the device), and the
    round fails only at its one host read: the mean loss at the end (no per-step sync)."""
    cfg, data = site
    model = build_model(cfg.model, data.schema, 0).to(META)
    seen = _record_input_devices(model)
    made: list[torch.optim.Optimizer] = []
    monkeypatch.setattr("clients.trainer.make_optimizer", lambda p, c: made.append(make_optimizer(p, c)) or made[-1])
    with pytest.raises(NotImplementedError, match=NO_DATA) as err:
        train_local(model, data, dataclasses.replace(cfg.train, max_steps_per_round=3), seed=0)
    last = err.traceback[-1]  # where the host read happened: the round's mean loss, after every step
    assert last.frame.code.name == "train_local" and "mean_loss=" in str(last.statement)
    assert len(seen) == 3 and all(devices == {META} for devices in seen)  # every step's batch
    state = [t for s in made[0].state.values() for t in s.values() if isinstance(t, torch.Tensor) and t.dim()]
    assert state and {t.device for t in state} == {META}  # Adam's moments live where the weights do
    assert {p.device for p in model.parameters()} == {META}


def test_evaluation_runs_on_the_device_and_reads_back_only_the_outputs(site):
    cfg, data = site
    model = build_model(cfg.model, data.schema, 0).to(META)
    seen = _record_input_devices(model)
    with pytest.raises(NotImplementedError, match=NO_DATA):
        evaluate_site(model, data)
    assert seen == [{META}]  # the first task's test batch ran there; its outputs' host read stopped it


def test_the_shared_site_model_is_built_on_the_configured_device(monkeypatch, smoke_corpus):
    """engine.device, or the node config's `device` where a site sets one (a hospital knows its
    hardware); the model is built on the host, then moved."""
    asked: list[str] = []
    monkeypatch.setattr(site_runtime, "resolve_device", lambda spec: asked.append(spec) or META)
    cfg = load_config(["scale=smoke", "engine.device=cuda:7"])
    run_config = {CONFIG_KEY: config_to_yaml(cfg) + "# placement test\n", CORPUS_KEY: str(smoke_corpus)}
    model = site_runtime.site_runtime(run_config, {"partition-id": 0}).model
    assert asked == ["cuda:7"] and {p.device for p in model.parameters()} == {META}
    reference = build_model(cfg.model, Corpus.open(smoke_corpus).schema, cfg.seed)  # same shapes
    assert {k: v.shape for k, v in model.state_dict().items()} == {
        k: v.shape for k, v in reference.state_dict().items()
    }
    own = site_runtime.site_runtime(run_config, {"partition-id": 1, DEVICE_KEY: "cpu"}).model
    assert asked == ["cuda:7", "cpu"] and own is not model
    with pytest.raises(site_runtime.SiteConfigError, match="node config device='gpu0': must be one of"):
        site_runtime.site_runtime(run_config, {"partition-id": 1, DEVICE_KEY: "gpu0"})


def test_scaffold_control_variates_follow_the_model_to_its_device():
    server = {"w": torch.ones(3)}
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    context.state[CONTROL_STATE] = ArrayRecord({"w": torch.full((3,), 2.0)})
    control = SiteControl(context, server, META)
    assert control.server["w"].device == META and control.site["w"].device == META
    assert control.correction().correction["w"].device == META


# --- precision -----------------------------------------------------------------------------


def _trained(cfg, data, precision: str, seed: int = 3):
    model = build_model(cfg.model, data.schema, 0)
    train = dataclasses.replace(cfg.train, precision=precision, max_steps_per_round=6)
    result = train_local(model, data, train, seed=seed)
    return result, torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_reproducibly_and_differently_from_fp32(site, precision):
    cfg, data = site
    fp32, w32 = _trained(cfg, data, "fp32")
    first, w1 = _trained(cfg, data, precision)
    again, w2 = _trained(cfg, data, precision)
    assert torch.equal(w1, w2) and first.mean_loss == again.mean_loss  # deterministic on CPU
    assert 1 <= first.steps <= fp32.steps and torch.isfinite(w1).all()  # fp16 may skip an overflowed step
    assert not torch.equal(w1, w32)  # autocast really ran the matmuls in the lower precision
    assert abs(first.mean_loss - fp32.mean_loss) < 0.05 * abs(fp32.mean_loss)  # ... of the same model
    assert all(p.dtype == torch.float32 for p in build_model(cfg.model, data.schema, 0).parameters())


def test_an_fp16_step_whose_gradients_overflowed_is_skipped_and_not_counted():
    w = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([w], lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(torch.tensor(1.0))  # the scaler starts its scale with the first loss it scales
    w.grad = torch.tensor([float("inf"), 1.0])
    scaler.unscale_(opt)
    assert scaled_step(scaler, opt) == 0 and torch.equal(w.detach(), torch.ones(2))
    w.grad = torch.tensor([1.0, 1.0])
    scaler.scale(torch.tensor(1.0))
    scaler.unscale_(opt)
    assert scaled_step(scaler, opt) == 1 and not torch.equal(w.detach(), torch.ones(2))
    assert scaled_step(None, opt) == 1


def test_autocast_runs_linear_layers_in_the_precision_and_fp32_is_untouched(site):
    cfg, data = site
    model = build_model(cfg.model, data.schema, 0)
    dtypes: set[torch.dtype] = set()
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_hook(lambda m, a, out: dtypes.add(out.dtype))
    task = data.plan.tasks[0]
    batch = data.split(task, "train").take(torch.arange(4))
    seen = {}
    for precision in ("fp32", "bf16", "fp16"):
        dtypes.clear()
        with autocast(torch.device("cpu"), precision):
            model(task, batch.inputs, batch.present)
        seen[precision] = set(dtypes)
    assert seen == {"fp32": {torch.float32}, "bf16": {torch.bfloat16}, "fp16": {torch.float16}}


@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_dp_sgd_in_bf16_clips_fp32_per_sample_gradients_within_the_norm(site, mode):
    """bf16 with DP-SGD: the per-sample gradients Opacus clips are fp32 (cast after backward),
    so the sensitivity bound the accountant assumes holds exactly for what is summed."""
    cfg, data = site
    task = data.plan.tasks[0]
    batch = data.split(task, "train").take(torch.arange(10))
    model = build_model(cfg.model, data.schema, 0)
    keep = {"fusion", f"head/{task}"} | {f"encoder/{m}" for m in data.schema.task(task).inputs}
    for name, p in model.named_parameters():
        p.requires_grad_(group_of(name) in keep)
    reference = copy.deepcopy(model)
    gsm = per_sample_module(model, mode)
    params = [p for p in model.parameters() if p.requires_grad]
    clip = 0.05
    opt = DPOptimizer(torch.optim.SGD(params, lr=0.1), noise_multiplier=0.0, max_grad_norm=clip, expected_batch_size=10)
    private_gradient(gsm, opt, data.schema.task(task), batch, "bf16")
    samples = torch.cat([p.grad_sample.reshape(10, -1) for p in opt.params], dim=1)
    assert samples.dtype == torch.float32
    norms = samples.norm(dim=1)
    assert (norms > clip).all()  # the bound is exercised
    clipped = samples * torch.clamp(clip / (norms + 1e-6), max=1.0)[:, None]
    got = torch.cat([p.grad.reshape(-1) for p in opt.params])
    assert (clipped.norm(dim=1) <= clip + 1e-6).all()
    assert torch.allclose(got, clipped.sum(0) / 10, atol=1e-6)
    # bf16 gradients of the same loss: close to the fp32 ones, not equal (autocast did run)
    want = []
    for i in range(10):
        reference.zero_grad(set_to_none=True)
        one = batch.take(torch.tensor([i]))
        per_sample_loss(data.schema.task(task), reference(task, one.inputs, one.present), one.targets).backward()
        want.append(torch.cat([p.grad.reshape(-1) for p in reference.parameters() if p.requires_grad]))
    want_t = torch.stack(want)
    assert not torch.allclose(samples, want_t, atol=1e-7)
    cosine = torch.nn.functional.cosine_similarity(samples, want_t, dim=1)
    assert (cosine > 0.98).all(), cosine


@pytest.mark.slow  # two whole runs; mixed precision itself: the unit tests above
def test_a_run_in_bf16_completes_with_finite_scores_near_fp32(tmp_path):
    scores = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        args = ["run", "--out", str(out), "--no-progress", "scale=smoke", "rounds=2", f"train.precision={precision}"]
        assert main(args) == 0
        final = json.loads((out / "summary.json").read_text())["final"]
        scores[precision] = [final["id"]["score"], *final["id"]["per_task"].values()]
    assert all(math.isfinite(s) for s in scores["bf16"])
    assert scores["bf16"] != scores["fp32"]  # the run trained in bf16 ...
    assert abs(scores["bf16"][0] - scores["fp32"][0]) < 0.05  # ... the same model, to bf16's precision
