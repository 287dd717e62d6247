"""What the server records about privacy: each site's latest privacy report, per round.

Sites under dp_sgd send a 'privacy' ConfigRecord with every training reply (clients/dp_sgd.py);
site-level DP (strategies/site_dp.py) reports from the server. Both end up in summary.json's
`privacy` (per site) and as `epsilon` rows in metrics.parquet / TensorBoard.
"""

from __future__ import annotations

from typing import Any

PRIVACY_RECORD = "privacy"


def report_from_record(record: Any) -> dict[str, Any]:
    """A ConfigRecord's values as plain JSON-able Python values."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        out[key] = list(value) if isinstance(value, (list, tuple)) else value
    return out
