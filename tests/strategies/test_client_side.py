"""Site sides of the strategies: FedProx's pull, SCAFFOLD's control variate, personal parameters."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

from clients.site_data import SiteData
from clients.trainer import train_local
from federated.core.arrays import record_to_torch
from federated.core.config import load_config
from federated.core.config.schema import ModelConfig, TrainConfig
from federated.core.config.strategy_section import strategy_config
from federated.core.models import build_model, group_of
from federated.core.multimed import MULTIMED
from federated.core.protocol import CONFIG_RECORD
from federated.data.format import Corpus
from partitions import plan_sites
from strategies import ClientAlgorithm, SiteRound, client_algorithm
from strategies.fedprox import PROXIMAL_MU, FedProxClient, ProximalTerm
from strategies.personalisation import FedBNSettings, FedPerSettings, PersonalClient, PersonalSettings, local_keys
from strategies.scaffold import CONTROL_DELTA_RECORD, CONTROL_RECORD, CONTROL_STATE, ScaffoldClient, SiteControl


@pytest.fixture(scope="module")
def site(smoke_corpus):
    corpus = Corpus.open(smoke_corpus)
    plan = plan_sites(corpus, load_config(["scale=smoke"]))[2]  # neuro clinic: eeg + mri
    return SiteData(corpus, plan)


def _context() -> Context:
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})


def _round(model, content: RecordDict, context: Context, train: TrainConfig | None = None) -> SiteRound:
    start = {k: v.clone() for k, v in model.state_dict().items()}
    return SiteRound(model, start, content, context, train or TrainConfig())


def _distance(model, start) -> float:
    return float(sum(((p.detach() - start[n]) ** 2).sum() for n, p in model.named_parameters() if p.requires_grad))


def test_proximal_term_keeps_the_site_closer_to_the_global_model(site):
    cfg = TrainConfig(local_epochs=3, lr=0.01, optimizer="sgd")
    free = build_model(ModelConfig(), site.schema, 0)
    start = {k: v.clone() for k, v in free.state_dict().items()}
    train_local(free, site, cfg, seed=1)
    pulled = build_model(ModelConfig(), site.schema, 0)
    train_local(pulled, site, cfg, seed=1, hooks=(ProximalTerm(start, mu=50.0),))
    assert _distance(pulled, start) < 0.5 * _distance(free, start)


def test_fedprox_site_uses_the_mu_the_server_sent():
    model = build_model(ModelConfig(), MULTIMED, 0)
    client = FedProxClient(strategy_config("fedprox", {"proximal_mu": 0.01}))
    sent = client.before_train(_round(model, RecordDict({CONFIG_RECORD: ConfigRecord({PROXIMAL_MU: 0.5})}), _context()))
    (hook,) = sent.hooks
    assert isinstance(hook, ProximalTerm) and hook.mu == 0.5
    assert sent.after_train(3) == {}
    none = client.before_train(_round(model, RecordDict({CONFIG_RECORD: ConfigRecord({})}), _context()))
    assert none.hooks == ()


def test_scaffold_control_variate_follows_option_two(site):
    model = build_model(ModelConfig(), site.schema, 0)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    server = {k: torch.full_like(v, 0.01) for k, v in start.items()}
    context = _context()
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


def test_scaffold_site_round_corrects_gradients_and_sends_its_control_change(site):
    model = build_model(ModelConfig(), site.schema, 0)
    server = ArrayRecord({k: torch.full_like(v, 0.01) for k, v in model.state_dict().items()})
    content = RecordDict({CONFIG_RECORD: ConfigRecord({}), CONTROL_RECORD: server})
    context = _context()
    train = TrainConfig(lr=0.05, optimizer="sgd", momentum=0.0)
    client = ScaffoldClient(strategy_config("scaffold", {}))
    this_round = client.before_train(_round(model, content, context, train))
    assert len(this_round.hooks) == 1
    result = train_local(model, site, train, seed=0, hooks=this_round.hooks)
    records = this_round.after_train(result.steps)
    assert set(records) == {CONTROL_DELTA_RECORD} and CONTROL_STATE in context.state.array_records
    sent = record_to_torch(records[CONTROL_DELTA_RECORD])
    kept = context.state[CONTROL_STATE].to_torch_state_dict()
    torch.testing.assert_close(sent["fusion.norm.weight"], kept["fusion.norm.weight"])  # c started at 0
    with pytest.raises(ValueError, match="no 'control' record"):
        client.before_train(_round(model, RecordDict({CONFIG_RECORD: ConfigRecord({})}), _context()))


def test_local_keys_for_fedbn_and_fedper():
    model = build_model(ModelConfig(), MULTIMED, 0)
    norms = local_keys(model, FedBNSettings())
    norm_params = {
        f"{m}.{p}"
        for m, mod in model.named_modules()
        if isinstance(mod, (torch.nn.GroupNorm, torch.nn.LayerNorm))
        for p in ("weight", "bias")
    }
    assert set(norms) == norm_params
    assert "fusion.norm.weight" in norms and "fusion.blocks.0.attn.qkv.weight" not in norms
    heads = local_keys(model, FedPerSettings())
    assert heads and all(group_of(k).startswith("head/") for k in heads)
    assert local_keys(model, PersonalSettings()) == []


def test_personal_parameters_stay_at_the_site_across_rounds():
    model = build_model(ModelConfig(), MULTIMED, 0)
    client = PersonalClient(strategy_config("fedper", {}))
    context = _context()
    assert not client.load_personal(model, context)  # no personal model before the first round
    first = client.before_train(_round(model, RecordDict(), context))
    head = next(k for k in local_keys(model, FedPerSettings()))
    trained_value = model.state_dict()[head].clone() + 1.0
    model.load_state_dict({head: trained_value}, strict=False)  # "local training"
    assert first.after_train(1) == {}
    model.load_state_dict({head: torch.zeros_like(trained_value)}, strict=False)  # the next global model
    client.before_train(_round(model, RecordDict(), context))  # restores the site's own head
    torch.testing.assert_close(model.state_dict()[head], trained_value)
    model.load_state_dict({head: torch.zeros_like(trained_value)}, strict=False)
    assert client.load_personal(model, context)
    torch.testing.assert_close(model.state_dict()[head], trained_value)


def test_each_strategy_gets_its_registered_site_side():
    assert type(client_algorithm(strategy_config("fedprox", {}))) is FedProxClient
    assert type(client_algorithm(strategy_config("scaffold", {}))) is ScaffoldClient
    assert type(client_algorithm(strategy_config("fedbn", {}))) is PersonalClient
    base = client_algorithm(strategy_config("median", {}))
    assert type(base) is ClientAlgorithm  # server-only: the site side does nothing
    model = build_model(ModelConfig(), MULTIMED, 0)
    this_round = base.before_train(_round(model, RecordDict(), _context()))
    assert this_round.hooks == () and this_round.after_train(5) == {}
    assert not base.load_personal(model, _context())
