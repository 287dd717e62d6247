"""The multimodal multitask model: encoders per modality, an attention fusion, a head per task."""

from federated.core.models.architectures import ARCHITECTURES
from federated.core.models.multimed_model import MultiMedModel, build_model, group_of

__all__ = ["ARCHITECTURES", "MultiMedModel", "build_model", "group_of"]
