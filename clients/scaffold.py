"""SCAFFOLD's site side (Karimireddy et al. 2020, option II): the site's control variate.

c_site lives in the site's Flower Context across rounds. Each step corrects the gradient by
(c_server - c_site); after K local SGD steps at learning rate lr the site sets
c_site+ = c_site - c_server + (x - y) / (K * lr) on the parameters it trained, and sends the
change c_site+ - c_site back with its model.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context

from clients.trainer import ControlVariateCorrection
from federated.core.models import MultiMedModel

CONTROL_STATE = "scaffold-control"


class SiteControl:
    def __init__(self, context: Context, server_control: dict[str, torch.Tensor]) -> None:
        self.context = context
        self.server = server_control
        record = context.state.array_records.get(CONTROL_STATE)
        self.site = (record.to_torch_state_dict() if record is not None
                     else {k: torch.zeros_like(v) for k, v in server_control.items()})

    def correction(self) -> ControlVariateCorrection:
        return ControlVariateCorrection({k: self.server[k] - self.site[k] for k in self.server})

    def update(self, model: MultiMedModel, start: dict[str, torch.Tensor], steps: int,
               lr: float) -> dict[str, torch.Tensor]:
        """Store the new c_site; return its change (zero for parameters the site did not train)."""
        delta = {k: torch.zeros_like(v) for k, v in self.site.items()}
        if steps > 0:
            for name, p in model.named_parameters():
                if p.requires_grad:
                    new = self.site[name] - self.server[name] + (start[name] - p.detach()) / (steps * lr)
                    delta[name] = new - self.site[name]
                    self.site[name] = new
        self.context.state[CONTROL_STATE] = ArrayRecord({k: v.clone() for k, v in self.site.items()})
        return delta
