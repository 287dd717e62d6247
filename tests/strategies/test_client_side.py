"""Site-side pieces: FedProx's pull, SCAFFOLD's control variate, personal parameters, attacks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Context, RecordDict

from clients import personalisation
from clients.attacks import corrupt
from clients.scaffold import SiteControl
from clients.site_data import SiteData
from clients.trainer import ProximalTerm, train_local
from federated.core.config.schema import ModelConfig, StrategyConfig, TrainConfig
from federated.core.config import load_config
from federated.data.format import Corpus
from federated.core.models import build_model, group_of
from partitions import plan_sites


@pytest.fixture(scope="module")
def site(smoke_corpus):
    corpus = Corpus.open(smoke_corpus)
    plan = plan_sites(corpus, load_config(["scale=smoke"]))[2]  # neuro clinic: eeg + mri
    return SiteData(corpus, plan)


def _distance(model, start) -> float:
    return float(sum(((p.detach() - start[n]) ** 2).sum() for n, p in model.named_parameters() if p.requires_grad))


def test_proximal_term_keeps_the_site_closer_to_the_global_model(site):
    cfg = TrainConfig(local_epochs=3, lr=0.01, optimizer="sgd")
    free = build_model(ModelConfig(), 0)
    start = {k: v.clone() for k, v in free.state_dict().items()}
    train_local(free, site, cfg, seed=1)
    pulled = build_model(ModelConfig(), 0)
    train_local(pulled, site, cfg, seed=1, hooks=(ProximalTerm(start, mu=50.0),))
    assert _distance(pulled, start) < 0.5 * _distance(free, start)


def test_scaffold_control_variate_follows_option_two(site):
    model = build_model(ModelConfig(), 0)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    server = {k: torch.full_like(v, 0.01) for k, v in start.items()}
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    control = SiteControl(context, server)
    cfg = TrainConfig(lr=0.05, optimizer="sgd", momentum=0.0)
    result = train_local(model, site, cfg, seed=0, hooks=(control.correction(),))
    delta = control.update(model, start, result.steps, cfg.lr)
    for name, p in model.named_parameters():
        if p.requires_grad:  # c+ = c - c_server + (x - y) / (K lr), and c started at 0
            expected = -server[name] + (start[name] - p.detach()) / (result.steps * cfg.lr)
            torch.testing.assert_close(delta[name], expected)
        else:
            assert not delta[name].any()
    # the new control variate persists in the Context for the next round
    again = SiteControl(context, server)
    torch.testing.assert_close(again.site["fusion.norm.weight"], delta["fusion.norm.weight"])


def test_local_keys_for_fedbn_and_fedper():
    model = build_model(ModelConfig(), 0)
    norms = personalisation.local_keys(model, StrategyConfig(local_norms=True))
    norm_params = {f"{m}.{p}" for m, mod in model.named_modules()
                   if isinstance(mod, (torch.nn.GroupNorm, torch.nn.LayerNorm)) for p in ("weight", "bias")}
    assert set(norms) == norm_params
    assert "fusion.norm.weight" in norms and "fusion.blocks.0.attn.qkv.weight" not in norms
    heads = personalisation.local_keys(model, StrategyConfig(local_groups=["head/"]))
    assert heads and all(group_of(k).startswith("head/") for k in heads)
    assert personalisation.local_keys(model, StrategyConfig()) == []


def test_attacks_corrupt_as_documented():
    sent = {"w": np.array([1.0, 1.0], dtype=np.float32)}
    trained = {"w": np.array([2.0, 0.0], dtype=np.float32)}
    np.testing.assert_allclose(corrupt("sign_flip", 0, sent, trained)["w"], [-9.0, 11.0])
    np.testing.assert_allclose(corrupt("scale", 0, sent, trained)["w"], [1001.0, -999.0])
    assert np.isnan(corrupt("nan", 0, sent, trained)["w"]).all()
