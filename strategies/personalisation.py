"""FedBN and FedPer: parameters that stay at each site, and the personalised model they give.

FedBN-style (Li et al. 2021): the normalisation layers (GroupNorm/LayerNorm here) stay local;
FedPer-style (Arivazhagan et al. 2019): the chosen groups (by default the task heads) stay
local. The server still averages every parameter as modality_fedavg does (that average is the
global model scored at held-out sites), but a site trains and evaluates with its own copy of
its local parameters, kept in its Flower Context across rounds; a training site is also scored
with that personalised model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flwr.app import ArrayRecord, Context
from torch import nn

from federated.core.config.schema import StrategyConfig, StrategySettings
from federated.core.models import MultiMedModel, group_of
from strategies.client_side import ClientAlgorithm, ClientRound, Record, SiteRound
from strategies.fedavg import ModalityFedAvg
from strategies.registry import register_strategy

PERSONAL_STATE = "personal-params"  # the site's own copy of its local parameters, in Context.state


@dataclass(frozen=True)
class PersonalSettings(StrategySettings):
    # Parameter groups (prefixes of encoder/<modality>, fusion, head/<task>) that stay at each site.
    local_groups: list[str] = field(default_factory=list)
    local_norms: bool = False  # normalisation layers stay at each site

    def __post_init__(self) -> None:
        self.require(
            "local_groups",
            all(isinstance(p, str) and p for p in self.local_groups),
            "must be non-empty group prefixes, e.g. [head/]",
        )


@dataclass(frozen=True)
class FedBNSettings(PersonalSettings):
    local_norms: bool = True


@dataclass(frozen=True)
class FedPerSettings(PersonalSettings):
    local_groups: list[str] = field(default_factory=lambda: ["head/"])


def local_keys(model: MultiMedModel, settings: PersonalSettings) -> list[str]:
    """The model's parameters that stay at the site under these settings."""
    norm_modules = {name for name, m in model.named_modules() if isinstance(m, (nn.GroupNorm, nn.LayerNorm))}
    keys = []
    for name, _ in model.named_parameters():
        is_norm = name.rsplit(".", 1)[0] in norm_modules
        if (settings.local_norms and is_norm) or any(group_of(name).startswith(p) for p in settings.local_groups):
            keys.append(name)
    return keys


def restore(model: MultiMedModel, context: Context) -> bool:
    """Put the site's own copy of its local parameters into the model; False if it has none yet."""
    record = context.state.array_records.get(PERSONAL_STATE)
    if record is None:
        return False
    model.load_state_dict(record.to_torch_state_dict(), strict=False)
    return True


def keep(model: MultiMedModel, keys: list[str], context: Context) -> None:
    """Save the model's `keys` as the site's own copy, for its next round and its evaluation."""
    state = model.state_dict()
    context.state[PERSONAL_STATE] = ArrayRecord({k: state[k].detach().clone() for k in keys})


class PersonalRound(ClientRound):
    def __init__(self, site: SiteRound, keys: list[str]) -> None:
        super().__init__()
        self.site, self.keys = site, keys

    def after_train(self, steps: int) -> dict[str, Record]:
        # Only the groups the site trained (its model freezes the others): a stale copy of a
        # group it does not hold would come back as a move of an undeclared group, and be refused.
        trained = {name for name, p in self.site.model.named_parameters() if p.requires_grad}
        keys = [k for k in self.keys if k in trained]
        if keys:
            keep(self.site.model, keys, self.site.context)
        return {}


class PersonalClient(ClientAlgorithm):
    """Trains from the global model with the site's own local parameters, and keeps them after."""

    def __init__(self, cfg: StrategyConfig) -> None:
        super().__init__(cfg)
        self.settings = cfg.settings_as(PersonalSettings)

    def before_train(self, site: SiteRound) -> ClientRound:
        keys = local_keys(site.model, self.settings)
        if keys:
            restore(site.model, site.context)
        return PersonalRound(site, keys)

    def load_personal(self, model: MultiMedModel, context: Context) -> bool:
        return bool(local_keys(model, self.settings)) and restore(model, context)


@register_strategy("fedbn", FedBNSettings, client=PersonalClient)
class FedBN(ModalityFedAvg):
    """The server side is modality_fedavg's."""


@register_strategy("fedper", FedPerSettings, client=PersonalClient)
class FedPer(ModalityFedAvg):
    """The server side is modality_fedavg's."""
