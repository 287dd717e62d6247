import itertools

import pytest
import torch
from opacus.validators import ModuleValidator

from federated.core.config.schema import ModelConfig
from federated.core.models import build_model, group_of
from federated.core.multimed import CATALOGUE

CFG = ModelConfig(dim=32, heads=4)


def _batch(task: str, b: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded, so a test that compares two forward passes sees the same inputs on every run."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m in CATALOGUE.task(task).inputs:
        spec = CATALOGUE.modality(m)
        out[m] = (
            torch.randint(1, spec.vocab_size, (b, *spec.shape), generator=g)
            if spec.is_tokens
            else torch.randn(b, *spec.shape, generator=g)
        )
    return out


def _expected_shape(task: str, b: int) -> tuple[int, ...]:
    t = CATALOGUE.task(task)
    if t.target == "per_residue":
        return (b, t.label_shape[0], t.n_outputs)
    return (b,) if t.n_outputs == 1 else (b, t.n_outputs)


@pytest.mark.parametrize("task", CATALOGUE.task_names)
def test_forward_with_every_subset_of_modalities(task):
    model = build_model(CFG, CATALOGUE, seed=0).eval()
    inputs = _batch(task)
    mods = CATALOGUE.task(task).inputs
    for r in range(1, len(mods) + 1):
        for subset in itertools.combinations(mods, r):
            out = model(task, {m: inputs[m] for m in subset})
            assert out.shape == _expected_shape(task, 3)
            assert torch.isfinite(out).all()


def test_missing_modality_is_masked_out_per_sample():
    """A sample whose text is marked missing must not depend on what the missing text slot holds."""
    model = build_model(CFG, CATALOGUE, seed=0).eval()
    x = _batch("disease_classification", b=2)
    present = {"ct": torch.tensor([True, True]), "text": torch.tensor([False, True])}
    a = model("disease_classification", x, present)
    x2 = dict(x, text=_batch("disease_classification", b=2, seed=1)["text"])
    b = model("disease_classification", x2, present)
    torch.testing.assert_close(a[0], b[0])  # masked: unchanged
    assert not torch.allclose(a[1], b[1])  # present: changed
    # and equals running the image alone (a batch of 1 may take another matmul kernel: float32
    # rounding differs by ~1e-7 relative, far below what a leak of the masked slot would move)
    alone = model("disease_classification", {"ct": x["ct"][:1]})
    torch.testing.assert_close(a[:1], alone, rtol=1e-4, atol=1e-5)


def test_a_sample_with_nothing_present_stays_finite():
    model = build_model(CFG, CATALOGUE, seed=0).eval()
    x = _batch("medical_vqa", b=2)
    present = {"xray": torch.tensor([False, True]), "text": torch.tensor([False, True])}
    assert torch.isfinite(model("medical_vqa", x, present)).all()


def test_parameter_groups_cover_everything_once():
    model = build_model(CFG, CATALOGUE, seed=0)
    groups = model.parameter_groups()
    assert set(groups) == (
        {"fusion"} | {f"encoder/{m}" for m in CATALOGUE.modalities} | {f"head/{t}" for t in CATALOGUE.tasks}
    )
    names = [n for ns in groups.values() for n in ns]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert group_of("encoders.ct.net.0.weight") == "encoder/ct"
    assert group_of("heads.bone_age.net.2.bias") == "head/bone_age"
    with pytest.raises(ValueError, match="no parameter group"):
        group_of("stray.weight")


def test_the_model_has_only_its_schemas_encoders_and_heads():
    """A corpus holding bone_age and medical_vqa gets encoders for xray and text and two heads, nothing else."""
    schema = CATALOGUE.restrict(["medical_vqa", "bone_age"])
    model = build_model(CFG, schema, seed=0)
    assert set(model.parameter_groups()) == {
        "fusion",
        "encoder/xray",
        "encoder/text",
        "head/bone_age",
        "head/medical_vqa",
    }
    assert list(model.encoders) == ["xray", "text"]  # schema order, which fusion's modality ids follow
    assert model("bone_age", _batch("bone_age")).shape == (3,)
    with pytest.raises(ValueError, match="unknown task 'cell_type'"):
        model("cell_type", {"xray": torch.zeros(1, 1, 32, 32)})


def test_train_only_freezes_what_a_site_does_not_hold():
    model = build_model(CFG, CATALOGUE, seed=0)
    kept = model.train_only(["eeg", "mri"], ["motor_imagery"])
    assert kept == ["encoder/eeg", "encoder/mri", "fusion", "head/motor_imagery"]
    for name, p in model.named_parameters():
        assert p.requires_grad == (group_of(name) in kept)


def test_same_seed_same_weights_and_opacus_compatible():
    a, b = build_model(CFG, CATALOGUE, seed=3), build_model(CFG, CATALOGUE, seed=3)
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        torch.testing.assert_close(p, q, msg=n)
    assert not torch.equal(build_model(CFG, CATALOGUE, seed=4).fusion.slot.weight, a.fusion.slot.weight)
    assert ModuleValidator.validate(a, strict=False) == []
