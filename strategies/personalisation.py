"""Parameters that stay at a site (FedBN's normalisation layers, FedPer's chosen groups).

The server still averages them (that average is the global model scored at held-out sites),
but a site trains and evaluates with its own copy, kept in its Flower Context across rounds.
"""

from __future__ import annotations

from flwr.app import ArrayRecord, Context
from torch import nn

from federated.core.config.schema import StrategyConfig
from federated.core.models import MultiMedModel, group_of

PERSONAL_STATE = "personal-params"


def local_keys(model: MultiMedModel, cfg: StrategyConfig) -> list[str]:
    norm_modules = {name for name, m in model.named_modules() if isinstance(m, (nn.GroupNorm, nn.LayerNorm))}
    keys = []
    for name, _ in model.named_parameters():
        is_norm = name.rsplit(".", 1)[0] in norm_modules
        if (cfg.local_norms and is_norm) or any(group_of(name).startswith(p) for p in cfg.local_groups):
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
    state = model.state_dict()
    context.state[PERSONAL_STATE] = ArrayRecord({k: state[k].detach().clone() for k in keys})


