"""The synthetic MultiMed generator: format, determinism, validation and planted structure."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from federated.core.multimed import (
    CLOSED_SET,
    IGNORE_LABEL,
    MULTILABEL,
    MULTIMED,
    MULTIMED_TASKS,
    PAD_TOKEN,
    PER_RESIDUE,
    REGRESSION,
)
from federated.data.format import BASE_COLUMNS, Corpus, CorpusFormatError, index_column
from federated.data.synthetic import GeneratorConfig, build_synthetic_corpus, generate
from federated.data.synthetic import vocabulary as voc

SMALL = GeneratorConfig(n_origin_sites=3, samples_per_task_site=10)
Generated = tuple[pd.DataFrame, dict[str, np.ndarray], dict[str, np.ndarray]]
Views = dict[str, Callable[[np.ndarray], np.ndarray]]


@pytest.fixture(scope="module")
def small() -> Generated:
    return generate(SMALL)


# ----------------------------------------------------------------------------- format
def test_every_modality_at_registry_shape_and_dtype(small: Generated) -> None:
    _, arrays, _ = small
    assert set(arrays) == set(MULTIMED.modality_names)
    for m, arr in arrays.items():
        spec = MULTIMED.modality(m)
        assert arr.shape[1:] == spec.shape, m
        assert arr.dtype == np.dtype(spec.dtype), m
        if spec.is_tokens:
            assert arr.min() >= 0 and arr.max() < spec.vocab_size, m
        else:  # roughly standardised: a small net needs no extra normalisation
            assert np.isfinite(arr).all(), m
            assert abs(float(arr.mean())) < 1.5 and 0.2 < float(arr.std()) < 2.5, m


def test_every_task_target_has_its_type(small: Generated) -> None:
    manifest, _, targets = small
    assert set(targets) == set(MULTIMED_TASKS)
    for t, y in targets.items():
        spec = MULTIMED.task(t)
        rows = manifest[manifest["task"] == t].sort_values("target_row")
        assert y.shape == (len(rows), *spec.label_shape), t
        label = rows["label"].to_numpy()
        if spec.target == REGRESSION:
            assert y.dtype == np.float32
            np.testing.assert_allclose(label, y, rtol=1e-6)
        elif spec.target in (MULTILABEL, PER_RESIDUE):
            assert y.dtype == np.int64 and np.isnan(label).all(), t
        else:
            assert y.dtype == np.int64 and set(np.unique(y)) <= set(range(len(spec.classes))), t
            np.testing.assert_array_equal(label, y.astype(float))
    assert set(np.unique(targets["radiographic_findings"])) == {0, 1}
    assert set(np.unique(targets["protein_structure"])) == {IGNORE_LABEL, 0, 1, 2}
    ages = targets["bone_age"]
    assert ages.min() >= 12.0 and ages.max() <= 216.0


def test_manifest_columns_counts_and_splits(small: Generated) -> None:
    manifest, arrays, targets = small
    for col in (*BASE_COLUMNS, *(index_column(m) for m in MULTIMED.modalities)):
        assert col in manifest.columns, col
    assert len(manifest) == len(MULTIMED_TASKS) * SMALL.n_origin_sites * SMALL.samples_per_task_site
    assert manifest["sample_id"].is_unique and manifest["patient_id"].is_unique
    assert sorted(manifest["origin_site"].unique()) == ["site_00", "site_01", "site_02"]
    per_cell = manifest.groupby(["task", "origin_site"])["split"]
    assert (per_cell.size() == SMALL.samples_per_task_site).all()
    assert (per_cell.apply(lambda s: (s == "test").sum()) == SMALL.n_test()).all()
    assert set(manifest["split"]) == {"train", "test"}
    assert (manifest["dataset"] == "synthetic_" + manifest["task"]).all()
    for t in MULTIMED_TASKS:
        rows = manifest[manifest["task"] == t]
        assert sorted(rows["target_row"]) == list(range(len(targets[t])))
        for m in MULTIMED.modalities:
            has = rows[index_column(m)].to_numpy() >= 0
            assert has.all() if m in MULTIMED.task(t).inputs else not has.any(), (t, m)
    for m, arr in arrays.items():  # every array row belongs to exactly one sample
        idx = manifest[index_column(m)]
        assert sorted(idx[idx >= 0]) == list(range(len(arr))), m


def test_rows_are_laid_out_task_by_task_then_site_by_site(small: Generated) -> None:
    # the byte layout of a corpus: a change here changes every corpus built from a seed
    manifest, _, _ = small
    n, sites = SMALL.samples_per_task_site, SMALL.site_names
    expected = [(t, s) for t in SMALL.task_names for s in sites for _ in range(n)]
    assert list(zip(manifest["task"], manifest["origin_site"], strict=True)) == expected
    for t in SMALL.task_names:
        rows = manifest[manifest["task"] == t]
        assert rows["target_row"].tolist() == list(range(len(sites) * n))
        assert rows["sample_id"].iloc[n] == f"syn-{t}-{sites[1]}-00000"
    for m in MULTIMED.modalities:  # each modality's rows follow the manifest's order
        idx = manifest[index_column(m)].to_numpy()
        assert idx[idx >= 0].tolist() == list(range(int((idx >= 0).sum()))), m


def test_token_padding_is_a_tail_and_matches_ignored_labels(small: Generated) -> None:
    manifest, arrays, targets = small
    for m in ("text", "protein_sequence"):
        tokens = arrays[m]
        padded = tokens == PAD_TOKEN
        assert (padded[:, 1:] >= padded[:, :-1]).all(), f"{m} has padding before content"
    assert (arrays["genomic_sequence"] != PAD_TOKEN).all()
    rows = manifest[manifest["task"] == "protein_structure"]
    tokens = arrays["protein_sequence"][rows["idx_protein_sequence"].to_numpy()]
    labels = targets["protein_structure"][rows["target_row"].to_numpy()]
    np.testing.assert_array_equal(tokens == PAD_TOKEN, labels == IGNORE_LABEL)
    assert (tokens == PAD_TOKEN).any(axis=1).mean() > 0.2  # some chains are short


def test_vqa_answers_match_question_type(small: Generated) -> None:
    manifest, arrays, targets = small
    rows = manifest[manifest["task"] == "medical_vqa"]
    questions = arrays["text"][rows["idx_text"].to_numpy()]
    answers = targets["medical_vqa"][rows["target_row"].to_numpy()]
    presence = [voc.concept_token("ask_presence", s) for s in range(voc.N_SYNONYMS)]
    asks_presence = np.isin(questions, presence).any(axis=1)
    yes_no = np.isin(answers, [0, 1])
    np.testing.assert_array_equal(asks_presence, yes_no)
    assert len(MULTIMED.task("medical_vqa").classes) == 7 and MULTIMED.task("medical_vqa").target == CLOSED_SET


# ------------------------------------------------------------------------ determinism
def test_same_config_gives_identical_corpus(small: Generated) -> None:
    manifest, arrays, targets = generate(SMALL)
    pd.testing.assert_frame_equal(manifest, small[0])
    for m in arrays:
        assert arrays[m].tobytes() == small[1][m].tobytes(), m
    for t in targets:
        assert targets[t].tobytes() == small[2][t].tobytes(), t


def test_other_seed_gives_other_data(small: Generated) -> None:
    _, arrays, _ = generate(dataclasses.replace(SMALL, seed=1))
    for m in arrays:
        assert not np.array_equal(arrays[m], small[1][m]), m


def test_a_task_subset_holds_the_same_samples(small: Generated) -> None:
    manifest, arrays, targets = generate(dataclasses.replace(SMALL, tasks=("bone_age",)))
    full = small[0][small[0]["task"] == "bone_age"]
    np.testing.assert_array_equal(arrays["xray"], small[1]["xray"][full["idx_xray"].to_numpy()])
    np.testing.assert_array_equal(targets["bone_age"], small[2]["bone_age"])
    assert list(manifest["sample_id"]) == list(full["sample_id"])
    assert set(arrays) == {"xray"}


# ------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"samples_per_task_site": 4}, "samples_per_task_site"),
        ({"samples_per_task_site": 10.0}, "samples_per_task_site"),
        ({"n_origin_sites": 0}, "n_origin_sites"),
        ({"seed": -1}, "seed"),
        ({"test_fraction": 0.0}, "test_fraction"),
        ({"test_fraction": 1.0}, "test_fraction"),
        ({"origin_shift_severity": -0.5}, "origin_shift_severity"),
        ({"origin_shift_severity": float("nan")}, "origin_shift_severity"),
        ({"tasks": ("bone_age", "bone_age")}, "tasks"),
    ],
)
def test_invalid_config_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        GeneratorConfig(**kwargs)


def test_unknown_task_lists_the_valid_names() -> None:
    with pytest.raises(ValueError, match="bone_age") as err:
        GeneratorConfig(tasks=("bone_age", "tumour_grading"))
    assert "tumour_grading" in str(err.value) and "medical_vqa" in str(err.value)


def test_config_accepts_a_list_of_tasks() -> None:
    cfg = GeneratorConfig(tasks=["medical_vqa", "bone_age"])  # type: ignore[arg-type]
    assert cfg.tasks == ("medical_vqa", "bone_age")
    assert cfg.task_names == ("bone_age", "medical_vqa")  # registry order


# ------------------------------------------------------------------------- round trip
def test_build_and_open_round_trip(tmp_path: Path) -> None:
    cfg = GeneratorConfig(n_origin_sites=2, samples_per_task_site=5, seed=3)
    manifest, arrays, targets = generate(cfg)
    path = build_synthetic_corpus(tmp_path / "corpus", cfg)
    corpus = Corpus.open(path)
    pd.testing.assert_frame_equal(corpus.manifest, manifest, check_like=True)
    for m in arrays:
        np.testing.assert_array_equal(corpus.array(m), arrays[m])
    for t in targets:
        np.testing.assert_array_equal(corpus.targets(t), targets[t])
    assert corpus.spec["name"] == "synthetic-multimed"
    assert corpus.schema == MULTIMED and corpus.spec["schema"] == MULTIMED.to_dict()  # the corpus declares it
    config = {**dataclasses.asdict(cfg), "tasks": list(cfg.tasks)}  # JSON: lists, not tuples
    assert corpus.spec["provenance"] == {"generator": "synthetic", "config": config}
    assert corpus.spec["origin_sites"] == ["site_00", "site_01"]
    with pytest.raises(CorpusFormatError):
        build_synthetic_corpus(path, cfg)
    build_synthetic_corpus(path, cfg, overwrite=True)


# ----------------------------------------------------------------- planted structure
def _pooled(images: np.ndarray, k: int, instance_norm: bool = False) -> np.ndarray:
    if instance_norm:  # removes the site's brightness and contrast
        images = (images - images.mean(axis=(1, 2, 3), keepdims=True)) / images.std(axis=(1, 2, 3), keepdims=True)
    n, c, h, w = images.shape
    return images.reshape(n, c, h // k, k, w // k, k).mean(axis=(3, 5)).reshape(n, -1)


def _negation_marked_bow(tokens: np.ndarray) -> np.ndarray:
    """Bag of words in which a word right after a negation counts as a separate feature."""
    negations = [voc.concept_token("negation", s) for s in range(voc.N_SYNONYMS)]
    negated = np.zeros_like(tokens, dtype=bool)
    negated[:, 1:] = np.isin(tokens[:, :-1], negations)
    vocab = MULTIMED.modality("text").vocab_size
    out = np.zeros((len(tokens), 2 * vocab))
    np.add.at(out, (np.repeat(np.arange(len(tokens)), tokens.shape[1]), (tokens + vocab * negated).ravel()), 1.0)
    out[:, PAD_TOKEN] = 0.0
    return out


def _logistic_balanced_accuracy(x: np.ndarray, y: np.ndarray, train: np.ndarray) -> float:
    """Multinomial logistic regression (L2, LBFGS) on train rows; balanced accuracy on the rest."""
    mu, sd = x[train].mean(0), np.maximum(x[train].std(0), 0.1)
    z = torch.tensor((x - mu) / sd, dtype=torch.float64)
    target = torch.tensor(y)
    k = int(y.max()) + 1
    w = torch.zeros(z.shape[1], k, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")
    tr = torch.tensor(train)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(z[tr] @ w + b, target[tr]) + 1e-2 * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        pred = (z[~tr] @ w + b).argmax(1).numpy()
    test_y = y[~train]
    return float(np.mean([(pred[test_y == c] == c).mean() for c in np.unique(test_y)]))


@pytest.fixture(scope="module")
def multimodal() -> Generated:
    return generate(
        GeneratorConfig(
            samples_per_task_site=100,
            test_fraction=0.3,
            tasks=("disease_classification", "breast_cancer_classification"),
        )
    )


# Measured with seed 0 at origin_shift_severity 1 (balanced accuracy on 300 held-out samples):
#   disease: ct 0.59, text 0.55, fused 0.78;  breast cancer: pathology 0.70, tabular 0.71,
#   fused 0.83. Asserted margins leave room for small changes to the renderers.
@pytest.mark.parametrize(
    ("task_name", "views", "margin"),
    [
        (
            "disease_classification",
            {"ct": lambda a: _pooled(a, 4, instance_norm=True), "text": _negation_marked_bow},
            0.12,
        ),
        ("breast_cancer_classification", {"pathology": lambda a: _pooled(a, 8), "tabular": lambda a: a}, 0.07),
    ],
)
def test_fusing_the_modalities_beats_each_alone(
    multimodal: Generated, task_name: str, views: Views, margin: float
) -> None:
    manifest, arrays, targets = multimodal
    rows = manifest[manifest["task"] == task_name]
    y = targets[task_name][rows["target_row"].to_numpy()]
    train = rows["split"].to_numpy() == "train"
    feats = {m: f(arrays[m][rows[index_column(m)].to_numpy()]) for m, f in views.items()}
    single = {m: _logistic_balanced_accuracy(x, y, train) for m, x in feats.items()}
    fused = _logistic_balanced_accuracy(np.concatenate(list(feats.values()), axis=1), y, train)
    chance = 1.0 / len(MULTIMED.task(task_name).classes)
    assert all(acc > chance + 0.1 for acc in single.values()), single  # each view carries signal
    assert fused > max(single.values()) + margin, (single, fused)


def _f_ratio(values: np.ndarray, groups: np.ndarray) -> float:
    """One-way ANOVA F: between-site variance of a per-sample statistic over within-site."""
    labels = np.unique(groups)
    means = np.array([values[groups == g].mean() for g in labels])
    sizes = np.array([(groups == g).sum() for g in labels])
    between = (sizes * (means - values.mean()) ** 2).sum() / (len(labels) - 1)
    within = sum(((values[groups == g] - m) ** 2).sum() for g, m in zip(labels, means, strict=True))
    return float(between / (within / (len(values) - len(labels))))


def _mean_f(features: np.ndarray, groups: np.ndarray) -> float:
    """Mean F over features (genes, words): for shifts spread over many of them.

    Without a shift each F has mean ~1 and the mean over dozens of features stays close to 1.
    """
    keep = features.std(axis=0) > 0
    return float(np.mean([_f_ratio(f, groups) for f in features[:, keep].T]))


SITE_STATISTICS = {  # name -> (task, modality, per-sample statistic or feature matrix)
    "mri brightness": ("brain_tumor_classification", "mri", lambda a: a.mean(axis=(1, 2, 3))),
    "oct brightness": ("diabetic_retinopathy", "oct", lambda a: a.mean(axis=(1, 2, 3))),
    "ct contrast": ("disease_classification", "ct", lambda a: a.std(axis=(1, 2, 3))),
    "xray noise": ("radiographic_findings", "xray", lambda a: np.abs(np.diff(a, axis=-1)).mean(axis=(1, 2, 3))),
    "pathology stain": ("breast_cancer_classification", "pathology", lambda a: a.mean(axis=(2, 3))),
    "eeg power": ("motor_imagery", "eeg", lambda a: np.log((a**2).mean(axis=(1, 2)))),
    "scrna genes": ("cell_type", "scrna", lambda a: a),
    "text words": (
        "disease_classification",
        "text",
        lambda a: _negation_marked_bow(a)[:, : MULTIMED.modality("text").vocab_size],
    ),
    "gc content": ("expression_prediction", "genomic_sequence", lambda a: np.isin(a, [2, 3]).mean(axis=1)),
    "residues": (
        "protein_structure",
        "protein_sequence",
        lambda a: np.stack([(a == r).sum(1) / (a > 0).sum(1) for r in range(1, 21)], 1),
    ),
    "tabular units": ("breast_cancer_classification", "tabular", lambda a: a),
}


@pytest.fixture(scope="module")
def site_statistics() -> dict[float, dict[str, tuple[float, bool]]]:
    """(F ratio across 6 origin sites, averaged over features?) per statistic and severity."""
    out: dict[float, dict[str, tuple[float, bool]]] = {}
    for severity in (0.0, 1.0):
        manifest, arrays, _ = generate(
            GeneratorConfig(n_origin_sites=6, samples_per_task_site=40, origin_shift_severity=severity)
        )
        out[severity] = {}
        for name, (t, m, stat) in SITE_STATISTICS.items():
            rows = manifest[manifest["task"] == t]
            data = arrays[m][rows[index_column(m)].to_numpy()]
            values = stat(data.astype(np.float64) if data.dtype.kind == "f" else data)
            sites = rows["origin_site"].to_numpy()
            averaged = values.ndim == 2
            f = _mean_f(values, sites) if averaged else _f_ratio(values, sites)
            out[severity][name] = (f, averaged)
    return out


# Measured (seed 0, 40 samples per site): severity 0 -> F 0.3-1.3; severity 1 -> F 47-2800 for
# single statistics, mean F 7-90 for the feature-averaged ones (genes, words, residues, units).
@pytest.mark.parametrize("name", list(SITE_STATISTICS))
def test_sites_differ_only_when_shifted(site_statistics: dict[float, dict[str, tuple[float, bool]]], name: str) -> None:
    f0, averaged = site_statistics[0.0][name]
    f1, _ = site_statistics[1.0][name]
    # a single F(5, 234) exceeds 4.4 with probability 1e-3 when the sites do not differ
    assert f0 < (1.5 if averaged else 4.4), (name, f0)
    assert f1 > (4.0 if averaged else 20.0), (name, f1)
