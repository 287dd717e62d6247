"""Acquisition shift: identity at severity 0, deterministic per (site, seed, key), different
between sites, and each component moves its statistic by the amount shift_params drew."""

from itertools import pairwise
from types import SimpleNamespace

import numpy as np
import pytest

import partitions.acquisition_shift as acq
from federated.core.multimed import IMAGE, MULTIMED, PAD_TOKEN, SIGNAL, TOKENS, VECTOR
from federated.core.protocol import Role
from partitions.site_plan import STEPS, PlanError, SitePlan

SEED = 7
ALL = MULTIMED.modality_names
SITES = ["site_0", "site_5"]


def batch(modality: str, n: int, seed: int = 0) -> np.ndarray:
    """Standard-normal data, or uniform tokens 1..vocab-1 with the last quarter padded."""
    spec = MULTIMED.modality(modality)
    rng = np.random.default_rng(seed)
    if spec.kind == TOKENS:
        x = rng.integers(1, spec.vocab_size, size=(n, *spec.shape))
        x[:, 3 * spec.shape[-1] // 4 :] = PAD_TOKEN
        return x.astype(spec.dtype)
    return rng.standard_normal((n, *spec.shape)).astype(spec.dtype)


def _of_kind(kind):
    return [m for m in ALL if MULTIMED.modality(m).kind == kind]


# --- identity, determinism, site specificity ------------------------------------------------


@pytest.mark.parametrize("modality", ALL)
def test_severity_zero_is_the_identity(modality):
    x = batch(modality, 50)
    y = acq.shift_array(MULTIMED.modality(modality), x, 0.0, "site_0", SEED, key="train")
    assert y is not x and y.dtype == x.dtype
    np.testing.assert_array_equal(y, x)


@pytest.mark.parametrize("modality", ALL)
def test_same_call_repeats_sites_differ_dtype_and_shape_kept(modality):
    x = batch(modality, 200)
    a = acq.shift_array(MULTIMED.modality(modality), x, 1.0, "site_0", SEED, key="train")
    b = acq.shift_array(MULTIMED.modality(modality), x, 1.0, "site_0", SEED, key="train")
    other = acq.shift_array(MULTIMED.modality(modality), x, 1.0, "site_1", SEED, key="train")
    assert a.dtype == x.dtype and a.shape == x.shape
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, other)
    if MULTIMED.modality(modality).kind != VECTOR:  # vectors have no per-sample randomness
        assert not np.array_equal(a, acq.shift_array(MULTIMED.modality(modality), x, 1.0, "site_0", SEED, key="test"))


@pytest.mark.parametrize("modality", ALL)
@pytest.mark.parametrize("site", SITES)
def test_larger_severity_moves_data_further(modality, site):
    x = batch(modality, 300)
    distance = []
    for s in (0.25, 0.5, 1.0, 2.0):
        y = acq.shift_array(MULTIMED.modality(modality), x, s, site, SEED)
        if x.dtype.kind == "i":
            distance.append(float((y != x).mean()))
        else:
            distance.append(float(np.abs(y.astype(np.float64) - x).mean()))
    assert all(a < b for a, b in pairwise(distance)), distance


# --- images: each component alone, then all together ----------------------------------------


def _params(modality, site, severity=1.0):
    return acq.shift_params(MULTIMED.modality(modality), severity, site, SEED)


@pytest.mark.parametrize("site", SITES)
def test_image_offset_and_contrast(site):
    p, x = _params("ct", site), batch("ct", 2000)
    y = acq._affine(x, p["contrast"], p["offset"])
    assert abs(y.mean() - x.mean() - p["offset"]) < 0.02
    assert abs(y.std() / x.std() / p["contrast"] - 1) < 0.02


@pytest.mark.parametrize("severity", [0.5, 1.5])
def test_blur_reduces_white_noise_variance_by_the_kernel_factor(severity):
    sigma = _params("mri", "site_0", severity)["blur_sigma"]
    assert sigma > 0
    w = acq.gaussian_kernel(sigma)
    r = len(w) // 2
    x = batch("mri", 2000)
    y = acq._blur(x, sigma)[..., r:-r, r:-r]  # interior: no reflected edge
    # A separable kernel w x w on white noise keeps (sum w^2)^2 of the variance; tol 5%.
    assert abs(y.var() / x.var() / (w**2).sum() ** 2 - 1) < 0.05
    assert abs(y.mean() - x.mean()) < 0.02  # the kernel sums to 1


def test_noise_adds_its_variance():
    p, x = _params("xray", "site_0"), batch("xray", 2000)
    added = acq._noise(x, p["noise_std"], np.random.default_rng(1)) - x
    assert abs(added.var() / p["noise_std"] ** 2 - 1) < 0.05


@pytest.mark.parametrize("modality", _of_kind(IMAGE))
def test_whole_image_shift_matches_its_parameters(modality):
    p, x = _params(modality, "site_3"), batch(modality, 2000)
    y = acq.shift_array(MULTIMED.modality(modality), x, 1.0, "site_3", SEED).astype(np.float64)
    r = len(acq.gaussian_kernel(p["blur_sigma"])) // 2
    interior = y[..., r:-r, r:-r]
    k = (acq.gaussian_kernel(p["blur_sigma"]) ** 2).sum() ** 2
    assert abs(y.mean() - p["offset"]) < 0.02
    expected_var = p["contrast"] ** 2 * k + p["noise_std"] ** 2
    assert abs(interior.var() / expected_var - 1) < 0.05


# --- signals ---------------------------------------------------------------------------------


def _rms(a):
    return float(np.sqrt((a.astype(np.float64) ** 2).mean()))


@pytest.mark.parametrize("site", SITES)
def test_eeg_gain_scales_rms(site):
    p, x = _params("eeg", site), batch("eeg", 2000)
    assert abs(_rms(acq._affine(x, p["gain"], 0.0)) / _rms(x) / p["gain"] - 1) < 0.01


@pytest.mark.parametrize("site", SITES)
def test_dead_channel_share_matches_drop_probability(site):
    p = _params("eeg", site)["drop_prob"]
    x = np.ones((2000, 8, 128), dtype=np.float32)
    dead = (acq._channel_drop(x, p, np.random.default_rng(2)) == 0).all(axis=-1)
    se = np.sqrt(p * (1 - p) / dead.size)
    assert abs(dead.mean() - p) < 3 * se


def test_whole_eeg_shift_matches_its_parameters():
    p, x = _params("eeg", "site_3"), batch("eeg", 2000)
    y = acq.shift_array(MULTIMED.modality("eeg"), x, 1.0, "site_3", SEED).astype(np.float64)
    live = ~(y == 0).all(axis=-1)
    n = live.size
    assert abs((1 - live.mean()) - p["drop_prob"]) < 3 * np.sqrt(p["drop_prob"] * (1 - p["drop_prob"]) / n)
    # On live channels: gain * x + noise, so the RMS is sqrt(gain^2 + std^2); tol 1%.
    expected = np.sqrt(p["gain"] ** 2 + p["noise_std"] ** 2)
    assert abs(_rms(y[live]) / _rms(x[live]) / expected - 1) < 0.01
    assert abs((y[live] - p["gain"] * x[live]).var() / p["noise_std"] ** 2 - 1) < 0.05


# --- vectors: batch effect -------------------------------------------------------------------


@pytest.mark.parametrize("modality", _of_kind(VECTOR))
@pytest.mark.parametrize("site", SITES)
def test_batch_effect_shifts_and_scales_each_feature(modality, site):
    p, x = _params(modality, site), batch(modality, 2000)
    x = (x - x.mean(axis=0)) / x.std(axis=0)  # exactly standardised per feature
    y = acq.shift_array(MULTIMED.modality(modality), x, 1.0, site, SEED).astype(np.float64)
    assert p["offset"].shape == p["scale"].shape == MULTIMED.modality(modality).shape
    assert np.abs(y.mean(axis=0) - p["offset"]).max() < 0.05
    assert np.abs(y.std(axis=0) / p["scale"] - 1).max() < 0.02
    assert p["offset"].std() > 0.1  # a real, per-feature effect at severity 1


# --- tokens: drift ---------------------------------------------------------------------------


@pytest.mark.parametrize("modality", _of_kind(TOKENS))
@pytest.mark.parametrize("site", SITES)
def test_token_drift_rate_and_site_skew(modality, site):
    spec = MULTIMED.modality(modality)
    p, x = _params(modality, site), batch(modality, 20000)
    y = acq.shift_array(MULTIMED.modality(modality), x, 1.0, site, SEED)
    pad = x == PAD_TOKEN
    np.testing.assert_array_equal(y[pad], PAD_TOKEN)  # padding never changes
    assert (y[~pad] >= 1).all() and (y[~pad] < spec.vocab_size).all()
    # Originals are uniform over 1..V-1, so a replacement equals its original w.p. 1/(V-1).
    changed = (y != x)[~pad]
    expected = p["rate"] * (1 - 1 / (spec.vocab_size - 1))
    assert abs(changed.mean() - expected) < 3 * np.sqrt(expected * (1 - expected) / changed.size)
    # Changed tokens follow the site's skewed distribution q; 4 SE per token id.
    new = y[(y != x) & ~pad]
    freq = np.bincount(new - 1, minlength=spec.vocab_size - 1) / len(new)
    q = p["probs"]
    assert np.all(np.abs(freq - q) < 4 * np.sqrt(q * (1 - q) / len(new)) + 1 / len(new))


def test_signal_and_token_kinds_are_covered():
    assert _of_kind(SIGNAL) == ["eeg"] and len(_of_kind(TOKENS)) == 3


# --- the planner step ------------------------------------------------------------------------


def _plan(site, role, modalities):
    rows = np.arange(4)
    return SitePlan(
        site=site,
        role=role,
        archetype="a",
        origin_site=site,
        tasks=("t",),
        modalities=modalities,
        train_rows=rows if role == Role.TRAIN else rows[:0],
        test_rows=rows + 4,
    )


PLANS = [
    _plan("site_0", Role.TRAIN, ("ct", "text")),
    _plan("site_1", Role.TRAIN, ("eeg",)),
    _plan("site_2", Role.HELD_OUT, ("xray", "text", "tabular")),
]


def test_site_severities_cover_every_modality_of_every_site_in_range():
    out = acq.site_severities(PLANS, 0.8, seed=3)
    for before, after in zip(PLANS, out, strict=True):
        assert set(after.shift) == set(before.modalities)
        assert all(0.5 * 0.8 <= s <= 1.5 * 0.8 for s in after.shift.values())
        assert after.shift_seed == 3 and after.site == before.site
        np.testing.assert_array_equal(after.test_rows, before.test_rows)
    assert [p.shift for p in acq.site_severities(PLANS, 0.8, seed=3)] == [p.shift for p in out]
    assert out[0].shift["text"] != out[2].shift["text"]  # each site its own severity
    assert [p.shift for p in acq.site_severities(PLANS, 0.8, seed=4)] != [p.shift for p in out]


@pytest.mark.parametrize("bad", [-0.1, float("nan")])
def test_negative_severity_is_refused(bad):
    with pytest.raises(PlanError, match="sites.load_shift_severity"):
        acq.site_severities(PLANS, bad, seed=0)


def test_step_is_registered_and_active_only_with_a_severity():
    step = STEPS.get("acquisition_shift")
    on = SimpleNamespace(sites=SimpleNamespace(load_shift_severity=0.5), corpus=SimpleNamespace(seed=2))
    off = SimpleNamespace(sites=SimpleNamespace(load_shift_severity=0.0), corpus=SimpleNamespace(seed=2))
    assert step.active(on) and not step.active(off)
    out = step.apply(PLANS, None, on)
    assert all(p.shift_seed == 2 and min(p.shift.values()) >= 0.25 for p in out)
