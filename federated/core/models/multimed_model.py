"""MultiMedModel: the one global model every site shares.

Parameter groups (`encoder/<modality>`, `fusion`, `head/<task>`) are derived from module
names, so a strategy can aggregate each group over the sites that trained it, and a site
can freeze what it does not hold.
"""

from __future__ import annotations

import torch
from torch import nn

from federated.core.config.schema import ModelConfig
from federated.core.corpus_schema import CorpusSchema
from federated.core.models.architectures import build_encoder
from federated.core.models.fusion import Fusion
from federated.core.models.heads import build_head
from federated.core.targets import PER_RESIDUE

_PREFIX_TO_GROUP = {"encoders": "encoder", "heads": "head"}


def group_of(param_name: str) -> str:
    """'encoders.ct.net.0.weight' -> 'encoder/ct'; 'fusion.slot.weight' -> 'fusion'."""
    first, _, rest = param_name.partition(".")
    if first == "fusion":
        return "fusion"
    if first in _PREFIX_TO_GROUP:
        return f"{_PREFIX_TO_GROUP[first]}/{rest.partition('.')[0]}"
    raise ValueError(f"parameter {param_name!r} belongs to no parameter group")


class MultiMedModel(nn.Module):
    """An encoder per modality of the schema, one fusion block, a head per task of the schema."""

    def __init__(self, cfg: ModelConfig, schema: CorpusSchema) -> None:
        super().__init__()
        self.cfg = cfg
        self.schema = schema
        self.modality_names = schema.modality_names
        self.encoders = nn.ModuleDict({m: build_encoder(schema.modality(m), cfg) for m in self.modality_names})
        self.fusion = Fusion(
            len(self.modality_names), cfg.tokens_per_modality, cfg.dim, cfg.heads, cfg.fusion_layers, cfg.dropout
        )
        self.heads = nn.ModuleDict({t: build_head(schema.task(t), cfg.dim) for t in schema.task_names})

    def forward(
        self, task: str, inputs: dict[str, torch.Tensor], present: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Predict `task` from the task's input modalities.

        inputs[m]: a batch of modality m (zeros where a sample lacks it);
        present[m]: [B] bool, False where the sample lacks m (masked out of fusion).
        Modalities absent from `inputs` are treated as missing for the whole batch.
        """
        spec = self.schema.task(task)
        used = [m for m in spec.inputs if m in inputs]
        if not used:
            raise ValueError(f"task {task!r} needs at least one of {spec.inputs}; got {list(inputs)}")
        tokens, ids, masks = [], [], []
        positions = None
        for m in used:
            tok, pos = self.encoders[m](inputs[m])
            tokens.append(tok)
            ids.append(self.modality_names.index(m))
            p = present.get(m) if present and self.cfg.missing == "mask" else None
            # missing="zeros" (an ablation): a missing modality's zeros are fused as if data
            masks.append(p if p is not None else torch.ones(tok.shape[0], dtype=torch.bool, device=tok.device))
            if pos is not None and spec.target == PER_RESIDUE:
                positions = pos
        fused = self.fusion(tokens, ids, masks)
        out = self.heads[task](fused, positions)
        return out.squeeze(-1) if out.shape[-1] == 1 else out

    def parameter_groups(self) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {}
        for name, _ in self.named_parameters():
            groups.setdefault(group_of(name), []).append(name)
        return groups

    def train_only(self, modalities: list[str] | tuple[str, ...], tasks: list[str] | tuple[str, ...]) -> list[str]:
        """Freeze every group a site does not hold; returns the groups left trainable.

        Opacus needs a per-sample gradient for every trainable parameter in every step, so
        encoders and heads a site never runs must be frozen; they are also exactly the groups
        a modality-aware strategy should not average in from this site.
        """
        keep = {"fusion"} | {f"encoder/{m}" for m in modalities} | {f"head/{t}" for t in tasks}
        for name, p in self.named_parameters():
            p.requires_grad_(group_of(name) in keep)
        return sorted(keep)


def build_model(cfg: ModelConfig, schema: CorpusSchema, seed: int) -> MultiMedModel:
    """Same config, schema and seed -> the same initial weights, in any process."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return MultiMedModel(cfg, schema)
    finally:
        torch.random.set_rng_state(gen_state)
