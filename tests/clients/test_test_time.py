"""Test-time adaptation (ood.adapt): what TENT and bn_stats change, their maths by hand, a toy
with a pure intensity shift where adaptation recovers what the shift costs, and a run's report."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from clients.site_data import SiteData
from clients.test_time import (
    adapt_site_model,
    bn_stats,
    prediction_entropy,
    softmax_entropy,
    tent,
)
from federated.app.cli import main
from federated.core.config import load_config
from federated.core.corpus_schema import Task
from federated.core.models import build_model
from federated.core.models.adaptable import NothingToAdaptError, check_adaptable, norm_affine_parameters
from federated.core.multimed import MULTIMED
from federated.data.format import Corpus
from partitions import plan_sites


def _task(target: str) -> Task:
    """A MultiMed task of this target type (only its type matters to the entropy)."""
    return next(t for t in MULTIMED.tasks.values() if t.target == target)


def test_entropy_of_each_target_type_by_hand():
    assert float(softmax_entropy(torch.zeros(3, 4))) == pytest.approx(math.log(4))
    logits = torch.tensor([[2.0, 0.0]])
    p = torch.softmax(logits, -1)[0]
    assert float(softmax_entropy(logits)) == pytest.approx(float(-(p * p.log()).sum()))
    binary = _task("binary")
    q = 1 / (1 + math.exp(-1.5))
    assert float(prediction_entropy(binary, torch.tensor([1.5]))) == pytest.approx(
        -(q * math.log(q) + (1 - q) * math.log(1 - q))
    )
    multilabel = _task("multilabel")
    assert float(prediction_entropy(multilabel, torch.zeros(2, 3))) == pytest.approx(3 * math.log(2))  # labels add
    assert prediction_entropy(_task("regression"), torch.zeros(4)) is None


def _default_site(smoke_corpus):
    cfg = load_config(["scale=smoke", "ood.adapt=tent", "ood.adapt_steps=5", "ood.adapt_lr=0.05"])
    corpus = Corpus.open(smoke_corpus)
    plan = next(p for p in plan_sites(corpus, cfg) if p.role == "held_out")
    return cfg, SiteData(corpus, plan)


def test_tent_changes_only_normalisation_affine_parameters_of_a_copy(smoke_corpus):
    cfg, data = _default_site(smoke_corpus)
    model = build_model(cfg.model, data.schema, 0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapted = adapt_site_model(model, data, cfg.ood, seed=1)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the global model is untouched
    changed = {k for k, v in adapted.state_dict().items() if not torch.equal(v, before[k])}
    allowed = {name for name, _ in norm_affine_parameters(model)}
    assert changed and changed <= allowed
    assert any(".norm" in k for k in changed)  # the fusion block's LayerNorms moved
    assert not any(p.requires_grad for p in adapted.parameters())


def test_adaptation_that_cannot_change_the_model_is_refused_with_the_reason():
    plain = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(NothingToAdaptError, match="no normalisation layer with affine parameters"):
        check_adaptable(plain, "tent")
    model = build_model(load_config([]).model, MULTIMED, 0)  # GroupNorm and LayerNorm only
    check_adaptable(model, "tent")
    with pytest.raises(NothingToAdaptError, match="no BatchNorm layer with running statistics"):
        check_adaptable(model, "bn_stats")


# --- the toy: two classes of 8x8 images, a pure intensity shift at the new site --------------


def _images(n: int, shift: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class 0 is bright in the top half, class 1 in the bottom half; plus noise and `shift`."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(2, (n,), generator=gen)
    x = 0.3 * torch.randn(n, 1, 8, 8, generator=gen)
    x[y == 0, :, :4] += 1.0
    x[y == 1, :, 4:] += 1.0
    return x + shift, y


def _toy_model() -> nn.Module:
    torch.manual_seed(0)
    # no padding: a constant added to the image shifts each conv channel by a constant, which
    # batch statistics remove and the source's running statistics do not
    return nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d((2, 1)), nn.Flatten(), nn.Linear(16, 2)
    )


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


@pytest.fixture(scope="module")
def toy():
    model = _toy_model()
    x, y = _images(512, 0.0, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    model.train()
    for i in range(150):
        idx = torch.arange(i * 64, (i + 1) * 64) % len(x)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    source = _accuracy(model, *_images(512, 0.0, seed=2))
    target_x, target_y = _images(512, 10.0, seed=3)  # a scanner offset far outside the source range
    return model, source, target_x, target_y


def test_on_a_pure_intensity_shift_tent_and_bn_stats_recover_the_lost_accuracy(toy):
    model, source, x, y = toy
    unadapted = _accuracy(model, x, y)
    batches = list(x.split(128))
    entropy = lambda m, b: softmax_entropy(m(b))  # noqa: E731
    adapted_tent = tent(model, batches, entropy, steps=4, lr=1e-3)
    adapted_bn = bn_stats(model, batches, lambda m, b: m(b))
    tent_acc = sum(
        _accuracy(adapted_tent, xb, yb) * len(xb) for xb, yb in zip(x.split(128), y.split(128), strict=True)
    ) / len(x)
    bn_acc = _accuracy(adapted_bn, x, y)
    print(f"source {source:.3f}, shifted {unadapted:.3f}, tent {tent_acc:.3f}, bn_stats {bn_acc:.3f}")
    assert source > 0.95
    assert unadapted < source - 0.25  # the shift costs the unadapted model
    assert tent_acc > unadapted + 0.25 and tent_acc > source - 0.05
    assert bn_acc > unadapted + 0.25 and bn_acc > source - 0.05
    assert _accuracy(model, x, y) == unadapted  # adaptation works on copies


def test_tent_moves_only_the_batchnorm_affine_and_bn_stats_no_parameter(toy):
    model, _, x, _ = toy
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adapted = tent(model, list(x.split(128)), lambda m, b: softmax_entropy(m(b)), steps=3, lr=1e-2)
    moved = {k for k, v in adapted.named_parameters() if not torch.equal(v, before[k])}
    assert moved == {"1.weight", "1.bias"}
    stats = bn_stats(model, list(x.split(128)), lambda m, b: m(b))
    assert all(torch.equal(p, before[k]) for k, p in stats.named_parameters())
    assert not torch.allclose(stats.state_dict()["1.running_mean"], before["1.running_mean"])
    # cumulative average over the batches: the running mean is the channel mean of the target conv outputs
    with torch.no_grad():
        conv = model[0](x)
    assert torch.allclose(stats.state_dict()["1.running_mean"], conv.mean((0, 2, 3)), atol=1e-4)


# --- a run ---------------------------------------------------------------------------------


def test_a_run_reports_the_adapted_and_unadapted_ood_scores(tmp_path):
    out = tmp_path / "tent"
    args = ["run", "--out", str(out), "--no-progress", "scale=smoke", "rounds=2"]
    assert main([*args, "ood.adapt=tent", "ood.adapt_steps=20", "ood.adapt_lr=0.2"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    final = summary["final"]
    assert set(final["ood_adapted"]["per_task"]) == set(final["ood"]["per_task"])
    held_out = [s for s in summary["per_site"] if s["role"] == "held_out"]
    assert held_out and all(math.isfinite(s["adapted_score"]) for s in held_out)
    assert all(s["adapted_per_task"] != s["per_task"] for s in held_out)  # the adaptation changed predictions
    assert not any("adapted_score" in s for s in summary["per_site"] if s["role"] != "held_out")
    assert "ood_adapted" not in summary["initial"]  # only the last round adapts


def test_adaptation_without_a_held_out_site_or_with_nothing_to_adapt_is_refused(tmp_path, capsys):
    base = ["run", "--out", str(tmp_path / "r"), "--no-progress", "scale=smoke", "rounds=1"]
    assert main([*base, "ood.adapt=tent", "sites.held_out=[]"]) == 2
    assert "ood.adapt=tent: this run holds out no site" in capsys.readouterr().err
    assert main([*base, "ood.adapt=bn_stats"]) == 2
    assert "no BatchNorm layer with running statistics" in capsys.readouterr().err
    assert not (tmp_path / "r" / "summary.json").exists()
