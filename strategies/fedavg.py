"""FedAvg (McMahan et al. 2017) and its modality-aware form.

`fedavg` is the plain baseline: every parameter averaged over every site, weighted by examples,
so a site's untouched copy of an encoder it never ran counts as much as a trained one.
`modality_fedavg` averages each parameter group (`encoder/<modality>`, `fusion`, `head/<task>`)
only over the sites that trained it, weighted by that group's examples; a group nobody trained
this round keeps its value. Neither has settings beyond the common ones.
"""

from __future__ import annotations

from strategies.aggregation import weighted_mean
from strategies.base import Arrays, MultiMedStrategy
from strategies.registry import register_strategy
from strategies.secure_sums import GROUPED, SINGLE, SecureSupport


@register_strategy("fedavg")
class FedAvg(MultiMedStrategy):
    SECURE = SecureSupport.sums(SINGLE)

    def aggregate(
        self, current: Arrays, updates: list[Arrays], weights: list[float], group_weights: list[dict[str, float]]
    ) -> Arrays:
        return weighted_mean(updates, weights)


@register_strategy("modality_fedavg")
class ModalityFedAvg(MultiMedStrategy):
    """The base template's default aggregation, named."""

    SECURE = SecureSupport.sums(GROUPED)
