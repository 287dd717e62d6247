"""Issue 14, "Why" item 5: every bad setting fails before training, with the key named.

Each case goes through `multimed-fl run` as a user types it and checks the exit code 2, the key in
the message, and that the output folder was never created (nothing ran, nothing was written).
"""

from __future__ import annotations

import math

import pytest

from federated.app.cli import main
from federated.core.config import ConfigError, load_config
from federated.core.config.checks import SEED_LIMIT
from federated.core.multimed import MULTIMED
from federated.server.preflight import check_model, check_plan_names, model_bytes


def _refused(tmp_path, capsys, corpus, *overrides: str) -> str:
    out = tmp_path / "run"
    code = main(["run", "--out", str(out), "--no-progress", "scale=smoke", f"corpus.path={corpus}", *overrides])
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2, err
    assert not out.exists(), sorted(p.name for p in out.iterdir())  # refused before anything was written
    return err


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.lr=inf", "train.lr=inf: must be a finite number"),
        ("train.lr=-inf", "train.lr=-inf: must be a finite number"),
        ("train.momentum=nan", "train.momentum=nan: must be a finite number"),
        ("train.weight_decay=nan", "train.weight_decay=nan: must be a finite number"),
        ("corpus.test_fraction=nan", "corpus.test_fraction=nan: must be a finite number"),
        ("engine.round_timeout_s=inf", "engine.round_timeout_s=inf: must be a finite number"),
        ("privacy.delta=nan", "privacy.delta=nan: must be a finite number"),
    ],
)
def test_non_finite_floats_are_refused_by_key(tmp_path, capsys, smoke_corpus, override, key):
    assert key in _refused(tmp_path, capsys, smoke_corpus, override)


def test_a_strategy_setting_that_is_not_finite_is_refused_by_key(tmp_path, capsys, smoke_corpus):
    err = _refused(tmp_path, capsys, smoke_corpus, "strategy=fedadam", "strategy.server_lr=inf")
    assert "strategy.server_lr=inf" in err


def test_infinite_target_epsilon_says_to_use_privacy_none(tmp_path, capsys, smoke_corpus):
    err = _refused(tmp_path, capsys, smoke_corpus, "privacy=dp_sgd", "privacy.target_epsilon=inf")
    assert "privacy.target_epsilon=inf" in err and "use privacy=none" in err


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.momentum=1.5", "train.momentum must be in [0, 1) (got 1.5)"),
        ("train.weight_decay=-0.1", "train.weight_decay must be >= 0 (got -0.1)"),
    ],
)
def test_ranges_are_named(tmp_path, capsys, smoke_corpus, override, key):
    assert key in _refused(tmp_path, capsys, smoke_corpus, override)


@pytest.mark.parametrize("seed", [str(2**64 + 5), str(SEED_LIMIT), "-1"])
def test_seeds_outside_the_rngs_range_are_refused(tmp_path, capsys, smoke_corpus, seed):
    for key in ("seed", "corpus.seed"):
        err = _refused(tmp_path, capsys, smoke_corpus, f"{key}={seed}")
        assert f"{key} must be in [0, 2**63)" in err and f"(got {seed})" in err


def test_the_largest_seed_is_accepted():
    assert load_config([f"seed={SEED_LIMIT - 1}"]).seed == SEED_LIMIT - 1


def test_an_impossible_model_dim_is_refused_with_the_estimate(tmp_path, capsys, smoke_corpus):
    err = _refused(tmp_path, capsys, smoke_corpus, "model.dim=4000000", "model.heads=4")
    assert "model.dim=4000000: the model needs about" in err and "GiB available" in err


def test_the_memory_estimate_counts_parameters_and_optimiser_state():
    adam = load_config(["scale=smoke"])
    sgd = load_config(["scale=smoke", "train.optimizer=sgd", "train.momentum=0"])
    with_momentum = load_config(["scale=smoke", "train.optimizer=sgd"])
    params = model_bytes(sgd, MULTIMED) // (4 * 2)  # weights and gradients
    assert params > 100_000
    assert model_bytes(adam, MULTIMED) == params * 4 * 4 and model_bytes(with_momentum, MULTIMED) == params * 4 * 3
    check_model(adam, MULTIMED)  # the default model fits
    # a corpus of one unimodal task needs one encoder and one head: far fewer parameters
    assert model_bytes(sgd, MULTIMED.restrict(["bone_age"])) < model_bytes(sgd, MULTIMED) // 2


def test_the_default_model_passes_every_check():
    cfg = load_config([])
    check_model(cfg, MULTIMED)
    assert math.isfinite(cfg.train.lr)


def test_check_model_names_an_unknown_architecture_and_a_missing_weights_file(tmp_path):
    with pytest.raises(ConfigError, match=r"^model.name: unknown model 'vit'; valid names: .*resnet18"):
        check_model(load_config(["scale=smoke", "model.name=vit"]), MULTIMED)
    missing = tmp_path / "w.pt"
    with pytest.raises(ConfigError, match=f"^model.init_weights: no such file {missing}$"):
        check_model(load_config(["scale=smoke", f"model.init_weights={missing}"]), MULTIMED)


def test_unknown_attacked_sites_are_named_with_the_valid_ones(tmp_path, capsys, smoke_corpus):
    err = _refused(tmp_path, capsys, smoke_corpus, "attack.kind=scale", "attack.sites=[site_00,site_42]")
    assert "attack.sites names sites that are not training sites in this run's plan: site_42" in err
    assert "(valid: site_00, site_01," in err


def test_a_held_out_site_cannot_be_attacked(tmp_path, capsys, smoke_corpus):
    err = _refused(tmp_path, capsys, smoke_corpus, "attack.kind=scale", "attack.sites=[site_09]")
    assert "attack.sites" in err and ": site_09 (valid:" in err


def test_unknown_failing_sites_are_named(tmp_path, capsys, smoke_corpus):
    err = _refused(tmp_path, capsys, smoke_corpus, "faults.kind=crash", "faults.sites=[hospital_x]")
    assert "faults.sites" in err and "hospital_x" in err and "valid: site_00" in err


def test_unknown_local_groups_are_named_with_the_groups(tmp_path, capsys, smoke_corpus):
    err = _refused(tmp_path, capsys, smoke_corpus, "strategy=fedper", "strategy.local_groups=[head/,encoder/eegg]")
    assert "strategy.local_groups names parameter groups no site of this plan has: encoder/eegg" in err
    assert "encoder/eeg," in err and "head/bone_age" in err and "fusion" in err


def test_known_names_pass_the_plan_checks(smoke_corpus):
    from federated.data.format import Corpus
    from partitions import plan_sites

    cfg = load_config(
        [
            "scale=smoke",
            f"corpus.path={smoke_corpus}",
            "strategy=fedper",
            "strategy.local_groups=[head/,encoder/eeg]",
            "attack.kind=scale",
            "attack.sites=[site_01]",
            "faults.kind=crash",
            "faults.sites=[site_02]",
        ]
    )
    check_plan_names(cfg, plan_sites(Corpus.open(smoke_corpus), cfg))
    # names listed for an attack that is off are not checked (they do nothing, by choice)
    off = load_config(["scale=smoke", "attack.sites=[nobody]"])
    check_plan_names(off, plan_sites(Corpus.open(smoke_corpus), off))


def test_krum_with_more_byzantine_sites_than_trainers_is_refused(tmp_path, capsys, smoke_corpus):
    err = _refused(tmp_path, capsys, smoke_corpus, "strategy=krum", "strategy.n_byzantine=8")
    assert "strategy.n_byzantine=8: assumes at least as many Byzantine sites as this plan has training sites (8)" in err


def test_load_config_alone_names_the_key():
    with pytest.raises(ConfigError, match=r"^train.lr=inf: must be a finite number$"):
        load_config(["train.lr=inf"])


@pytest.mark.parametrize(
    "overrides",
    [[], ["model.dim=128", "model.heads=8"], ["model.dim=36", "model.heads=3", "model.tokens_per_modality=9"]],
)
def test_the_parameter_count_is_exact(overrides):
    from federated.core.models import MultiMedModel
    from federated.server.preflight import parameter_count

    cfg = load_config(overrides)
    for schema in (MULTIMED, MULTIMED.restrict(["medical_vqa", "cell_type"])):
        want = sum(p.numel() for p in MultiMedModel(cfg.model, schema).parameters())
        assert parameter_count(cfg.model, schema) == want


def test_zero_heads_is_refused_by_key():
    with pytest.raises(ConfigError, match=r"^model.heads must be >= 1 \(got 0\)$"):
        load_config(["model.heads=0"])


def test_a_model_that_cannot_be_built_is_refused_before_the_run(tmp_path, capsys, smoke_corpus):
    err = _refused(tmp_path, capsys, smoke_corpus, "model.tokens_per_modality=2")
    assert "model: image encoders need a square token count, got 2" in err
