"""Simulated bad sites: what each attack does to a training reply's arrays."""

from __future__ import annotations

import numpy as np

from clients.attacks import corrupt


def test_attacks_corrupt_as_documented():
    sent = {"w": np.array([1.0, 1.0], dtype=np.float32)}
    trained = {"w": np.array([2.0, 0.0], dtype=np.float32)}
    np.testing.assert_allclose(corrupt("sign_flip", 0, sent, trained)["w"], [-9.0, 11.0])
    np.testing.assert_allclose(corrupt("scale", 0, sent, trained)["w"], [1001.0, -999.0])
    assert np.isnan(corrupt("nan", 0, sent, trained)["w"]).all()
