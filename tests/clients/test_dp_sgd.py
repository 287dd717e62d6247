"""DP-SGD at a site, tested the way Opacus tests its own privacy engine: clipping bound, noise
level, equality with plain training when DP is off, exact per-sample gradients with missing
modalities, accountant arithmetic across rounds, and the budget stop."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict
from opacus.accountants import RDPAccountant
from opacus.optimizers import DPOptimizer

from clients.dp_sgd import (
    PrivacyConfigError,
    PrivacyLedger,
    TaskPlan,
    check_model,
    per_sample_loss,
    per_sample_module,
    poisson_batch,
    private_gradient,
    step_order,
    train_private,
    use_task_groups,
)
from clients.site_data import SiteData
from federated.core.config import load_config
from federated.core.models import build_model, group_of
from federated.data.format import Corpus
from partitions import plan_sites

TASK = "disease_classification"  # ct + text: two modalities, one of which we mask


@pytest.fixture(scope="module")
def site(smoke_corpus):
    cfg = load_config(["scale=smoke", "privacy=dp_sgd", "sites.missing_sample_rate=0.5"])
    corpus = Corpus.open(smoke_corpus)
    plan = next(p for p in plan_sites(corpus, cfg) if TASK in p.tasks and p.role == "train")
    return cfg, SiteData(corpus, plan)


def _wrapped(cfg, data, sigma, clip, batch_size, mode="ew"):
    model = build_model(cfg.model, data.schema, 0)
    groups = set(model.train_only(data.plan.modalities, data.plan.tasks))
    keep = {"fusion", f"head/{TASK}"} | {f"encoder/{m}" for m in data.schema.task(TASK).inputs}
    for name, p in model.named_parameters():
        p.requires_grad_(group_of(name) in groups & keep)
    reference = copy.deepcopy(model)
    gsm = per_sample_module(model, mode)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = DPOptimizer(
        torch.optim.SGD(params, lr=0.1),
        noise_multiplier=sigma,
        max_grad_norm=clip,
        expected_batch_size=batch_size,
        generator=torch.Generator().manual_seed(0),
    )
    return model, reference, gsm, opt


def _sample_grads(reference, batch, n):
    """Micro-batches of one: the reference per-sample gradients, flattened."""
    params = [p for p in reference.parameters() if p.requires_grad]
    out = []
    for i in range(n):
        reference.zero_grad(set_to_none=True)
        one = batch.take(torch.tensor([i]))
        per_sample_loss(reference.schema.task(TASK), reference(TASK, one.inputs, one.present), one.targets).backward()
        out.append(torch.cat([p.grad.reshape(-1) for p in params]))
    return torch.stack(out)


@pytest.mark.parametrize("mode", ["ew", "hooks", "functorch"])
def test_per_sample_gradients_are_exact_with_missing_modalities(site, mode):
    cfg, data = site
    batch = data.split(TASK, "train").take(torch.arange(12))
    assert not bool(batch.present["text"].all()) or not bool(batch.present["ct"].all())  # some masked
    _, reference, gsm, opt = _wrapped(cfg, data, 0.0, 1e6, 12, mode)
    private_gradient(gsm, opt, data.schema.task(TASK), batch)  # computes p.grad_sample (and the private gradient)
    got = torch.cat([p.grad_sample.reshape(12, -1) for p in opt.params], dim=1)
    want = _sample_grads(reference, batch, 12)
    assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())


def test_every_clipped_per_sample_gradient_is_within_the_norm(site):
    cfg, data = site
    clip = 0.05
    batch = data.split(TASK, "train").take(torch.arange(10))
    _, reference, gsm, opt = _wrapped(cfg, data, 0.0, clip, 10)
    want = _sample_grads(reference, batch, 10)
    norms = want.norm(dim=1)
    assert (norms > clip).all()  # the bound is exercised, not vacuous
    private_gradient(gsm, opt, data.schema.task(TASK), batch)
    got = torch.cat([p.grad.reshape(-1) for p in opt.params])
    clipped = want * torch.clamp(clip / (norms + 1e-6), max=1.0)[:, None]
    assert (clipped.norm(dim=1) <= clip + 1e-6).all()
    assert torch.allclose(got, clipped.sum(0) / 10, atol=1e-6)
    assert float(got.norm()) <= clip + 1e-6  # a mean of vectors within C is within C


def test_noise_std_matches_sigma_c_over_b(site):
    cfg, data = site
    sigma, clip, b = 1.3, 0.7, 16
    _, _, gsm, opt = _wrapped(cfg, data, sigma, clip, b)
    private_gradient(gsm, opt, data.schema.task(TASK), None)  # an empty Poisson draw: noise only
    noise = torch.cat([p.grad.reshape(-1) for p in opt.params]).numpy()
    assert noise.size > 10_000
    assert abs(noise.std() / (sigma * clip / b) - 1) < 0.15
    assert abs(noise.mean()) < 3 * sigma * clip / b / np.sqrt(noise.size)


def test_without_noise_and_clipping_the_gradient_is_the_plain_one(site):
    cfg, data = site
    batch = data.split(TASK, "train").take(torch.arange(8))
    _, reference, gsm, opt = _wrapped(cfg, data, 0.0, 1e9, 8)
    private_gradient(gsm, opt, data.schema.task(TASK), batch)
    got = torch.cat([p.grad.reshape(-1) for p in opt.params])
    reference.zero_grad(set_to_none=True)
    per_sample_loss(reference.schema.task(TASK), reference(TASK, batch.inputs, batch.present), batch.targets).backward()
    want = torch.cat([p.grad.reshape(-1) for p in reference.parameters() if p.requires_grad])
    assert torch.allclose(got, want, atol=1e-6)


def test_accountant_reproduces_opacus_reference_value():
    ledger = PrivacyLedger(history={"t": [[1.5, 0.04, 2250]]})
    cfg = load_config(["privacy=dp_sgd"]).privacy
    assert ledger.epsilon("t", cfg) == pytest.approx(7.3291, abs=1e-4)


def _context():
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})


def test_cumulative_epsilon_over_rounds_equals_one_accountant_over_all_steps(site):
    cfg, data = site
    cfg = load_config(["scale=smoke", "privacy=dp_sgd", "rounds=3", "privacy.target_epsilon=4"])
    model, ctx = build_model(cfg.model, data.schema, 0), _context()
    reports = [train_private(model, data, cfg, r, ctx, r)[1] for r in (1, 2, 3)]
    eps = [r["epsilon"] for r in reports]
    assert eps[0] < eps[1] < eps[2] <= 4.0 + 1e-6  # cumulative, and the plan spends the target
    assert eps[2] > 3.9  # calibrated for exactly these rounds (Opacus' tolerance is 0.01)
    last = reports[-1]
    for t, sigma, q, steps, e in zip(
        last["tasks"],
        last["noise_multiplier"],
        last["sample_rate"],
        last["steps"],
        last["epsilon_per_task"],
        strict=True,
    ):
        one = RDPAccountant()
        for _ in range(steps):
            one.step(noise_multiplier=sigma, sample_rate=q)
        assert one.get_epsilon(cfg.privacy.delta) == pytest.approx(e, rel=1e-9), t
    # the ledger lives in the Flower Context (what checkpoints and real nodes keep)
    kept = PrivacyLedger.load(ctx)
    assert [int(sum(h[2] for h in kept.history[t])) for t in last["tasks"]] == last["steps"]


def test_the_budget_stops_training_and_the_site_says_so(site):
    _, data = site
    cfg = load_config(
        ["scale=smoke", "privacy=dp_sgd", "rounds=10", "privacy.noise_multiplier=2", "privacy.target_epsilon=5"]
    )
    model, ctx = build_model(cfg.model, data.schema, 0), _context()
    stopped_at, eps = None, []
    for r in range(1, 11):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        result, report = train_private(model, data, cfg, r, ctx, r)
        eps.append(report["epsilon"])
        if report["stopped_by_budget"]:
            stopped_at = stopped_at or r
            assert result.num_examples == 0 and result.steps == 0
            assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert stopped_at is not None and 1 < stopped_at <= 10
    assert max(eps) <= 5.0 + 1e-6 and eps[-1] == eps[stopped_at - 2]  # no spend after the stop


def test_batchnorm_is_refused_with_a_clear_error():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))
    with pytest.raises(PrivacyConfigError, match="BatchNorm"):
        check_model(model)


def test_step_order_runs_each_task_its_planned_steps_in_a_seeded_permutation():
    plans = {"a": TaskPlan(10, 0.5, 3), "b": TaskPlan(20, 0.25, 2)}
    order = step_order(plans, torch.Generator().manual_seed(3))
    assert sorted(order) == ["a", "a", "a", "b", "b"]
    perm = torch.randperm(5, generator=torch.Generator().manual_seed(3)).tolist()
    assert order == [["a", "a", "a", "b", "b"][i] for i in perm]  # one randperm: the draws after it are unmoved


def test_a_poisson_batch_draws_each_sample_with_the_sample_rate(site):
    _, data = site
    split = data.split(TASK, "train")
    assert len(poisson_batch(split, 1.0, torch.Generator().manual_seed(0)).targets) == len(split)
    assert poisson_batch(split, 0.0, torch.Generator().manual_seed(0)) is None  # a noise-only step
    drawn = poisson_batch(split, 0.5, torch.Generator().manual_seed(1))
    keep = torch.rand(len(split), generator=torch.Generator().manual_seed(1)) < 0.5
    assert torch.equal(drawn.targets, split.targets[keep])


def test_a_step_trains_only_the_site_groups_its_task_uses(site):
    cfg, data = site
    model = build_model(cfg.model, data.schema, 0)
    site_groups = set(model.train_only(data.plan.modalities, data.plan.tasks))
    uses = {"fusion", f"head/{TASK}", "encoder/ct", "encoder/text"}

    def trainable() -> set[str]:
        return {group_of(n) for n, p in model.named_parameters() if p.requires_grad}

    use_task_groups(model, TASK, site_groups)
    assert trainable() == site_groups & uses and "encoder/ct" in trainable()
    use_task_groups(model, TASK, site_groups - {"encoder/ct"})  # a group the site does not hold stays off
    assert trainable() == (site_groups - {"encoder/ct"}) & uses


def test_the_ledger_extends_an_entry_with_the_same_noise_and_rate_and_skips_empty_new_ones():
    ledger = PrivacyLedger(history={"a": [[1.0, 0.5, 4]]})
    ledger.record({"a": TaskPlan(10, 0.5, 3, 1.0), "b": TaskPlan(10, 0.5, 3, 1.0)}, {"a": 3, "b": 0})
    assert ledger.history == {"a": [[1.0, 0.5, 7]], "b": []}
    ledger.record({"a": TaskPlan(10, 0.25, 3, 1.0)}, {"a": 2})
    assert ledger.history["a"] == [[1.0, 0.5, 7], [1.0, 0.25, 2]]
