"""The local trainer of each privacy mode, looked up by name instead of branched on."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from flwr.app import Context, RecordDict

from clients.dp_sgd import PrivacyConfigError
from clients.local_trainers import LOCAL_TRAINERS, LocalJob
from clients.site_data import SiteData
from clients.trainer import mean_train_loss, task_loss, train_local
from federated.core.config import load_config
from federated.core.config.merge import group_choices
from federated.core.config.schema import PRIVACY_MODES
from federated.core.models import build_model
from federated.core.protocol import PRIVACY_RECORD
from federated.data.format import Corpus
from partitions import plan_sites


@pytest.fixture(scope="module")
def corpus(smoke_corpus):
    return Corpus.open(smoke_corpus)


def _job(corpus, overrides: list[str]) -> LocalJob:
    cfg = load_config(["scale=smoke", *overrides])
    data = SiteData(corpus, plan_sites(corpus, cfg)[2])
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    return LocalJob(build_model(cfg.model, data.schema, cfg.seed), data, cfg, seed=3, context=context, server_round=1)


def test_every_privacy_mode_has_a_local_trainer():
    assert sorted(LOCAL_TRAINERS.names()) == sorted(PRIVACY_MODES) == group_choices("privacy")


@pytest.mark.parametrize("mode", ["none", "dp_fedavg"])
def test_without_sample_level_dp_a_site_trains_as_train_local_does(corpus, mode):
    job = _job(corpus, [f"privacy={mode}", "strategy=fedavg"])
    trained = LOCAL_TRAINERS.get(mode)(job)
    reference = build_model(job.cfg.model, job.data.schema, job.cfg.seed)
    expected = train_local(reference, job.data, job.cfg.train, job.seed)
    assert trained.result == expected and trained.records == {}
    for (name, p), q in zip(job.model.state_dict().items(), reference.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_dp_sgd_trains_privately_and_reports_its_epsilon(corpus):
    job = _job(corpus, ["privacy=dp_sgd", "privacy.target_epsilon=3"])
    trained = LOCAL_TRAINERS.get("dp_sgd")(job)
    assert trained.result.steps > 0 and set(trained.records) == {PRIVACY_RECORD}
    report = trained.records[PRIVACY_RECORD]
    assert 0 < float(report["epsilon"]) <= 3.0 and report["mechanism"] == "dp_sgd (sample-level)"


def _weights(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_a_strategy_objective_is_the_loss_each_step_minimises(corpus):
    """With plain SGD, minimising 2 x the task loss is the same step as the task loss at twice
    the learning rate: the objective reaches every step, before backward."""
    job = _job(corpus, ["train.optimizer=sgd", "train.momentum=0", "train.lr=0.01"])
    seen: list[str] = []

    def doubled(task, loss, targets):
        seen.append(task)
        return 2 * loss

    a = build_model(job.cfg.model, job.data.schema, 0)
    result = train_local(a, job.data, job.cfg.train, seed=5, objective=doubled)
    b = build_model(job.cfg.model, job.data.schema, 0)
    train_local(b, job.data, dataclasses.replace(job.cfg.train, lr=0.02), seed=5)
    assert len(seen) == result.steps > 0 and set(seen) <= set(job.data.plan.tasks)
    assert torch.allclose(_weights(a), _weights(b), atol=1e-6)
    assert not torch.allclose(_weights(a), _weights(build_model(job.cfg.model, job.data.schema, 0)))


def test_dp_sgd_refuses_a_round_whose_strategy_changes_the_objective(corpus):
    job = dataclasses.replace(_job(corpus, ["privacy=dp_sgd"]), objective=lambda task, loss, targets: loss)
    with pytest.raises(PrivacyConfigError, match="changes the training objective"):
        LOCAL_TRAINERS.get("dp_sgd")(job)


def test_the_global_loss_is_the_sample_mean_of_the_task_losses(corpus):
    job = _job(corpus, [])
    model = job.model
    total, n = 0.0, 0
    with torch.no_grad():
        for task in job.data.plan.tasks:
            part = job.data.split(task, "train")
            loss = task_loss(job.data.schema.task(task), model(task, part.inputs, part.present), part.targets)
            total, n = total + float(loss) * len(part), n + len(part)
    assert mean_train_loss(model, job.data, batch_size=5) == pytest.approx(total / n, rel=1e-5)
