"""Tabular ingest at scale: does rows x features ingest linearly?

Each case is a CSV of R rows x F numeric features and a binary label, ingested by `run_spec`
with the tabular adapter and `simulated_sites: 3` (read, label, standardise per site, deal
patients into sites, split by patient, check, write the corpus atomically). A case ending in
`h` is a hospital table instead: a site column (5 hospitals), a patient id per row, a
categorical column with blanks and padded text, 1% missing values imputed by site median,
text labels mapped to classes. Side by side, in the same run, the floor: `pandas.read_csv` of
the same file and nothing else. Printed per case: wall and CPU seconds (the CPU figure holds
when other processes share the cores), microseconds per row, the ratio to the floor; and the
linearity figure, time(largest) / time(smallest) of the one-feature cases against their row
ratio (10 for 1M against 100k: linear ingest gives about 10, a per-row cost that grows more).

    python experiments/bench/ingest_scale.py [--quick] [--cases 100000x1,1000000x4h] [--out results.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from federated.app.bench import write_result
from federated.data.format import Corpus
from federated.data.ingest.spec import run_spec

CASES = "100000x1,300000x1,1000000x1,100000x20,1000000x4h"
QUICK_CASES = "20000x1,60000x1,200000x1,20000x20,20000x4h"
TARGET_S = 60.0  # issue 28: a 1,000,000-row, 1-feature CSV with simulated sites, on 2 cores


SIMULATED = "    simulated_sites: 3\n"
HOSPITALS = (
    "    labels: {B: benign, M: malignant}\n    site_column: hospital\n    patient_column: patient\n"
    "    categorical_columns: [smoker]\n    impute: median\n"
)


def spec_text(features: int, hospitals: bool) -> str:
    """The ingest spec of one case; the catalogue's tabular modality widened when it holds more than 16."""
    width = features + 2 * hospitals  # the categorical column's two indicator columns
    widen = f"modalities:\n  tabular: {{features: {width}}}\n" if width > 16 else ""
    return (
        f"name: scale\n{widen}sources:\n  - adapter: tabular\n    task: breast_cancer_classification\n"
        f"    path: table.csv\n    label_column: y\n{HOSPITALS if hospitals else SIMULATED}"
    )


def make_table(folder: Path, rows: int, features: int, hospitals: bool, seed: int = 0) -> Path:
    """A CSV of `rows` x `features` normal values and a label (and the hospital columns), and the
    spec beside it."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(rng.normal(size=(rows, features)), columns=[f"x{j}" for j in range(features)])
    if hospitals:
        frame.loc[rng.random(rows) < 0.01, "x0"] = np.nan
        frame["smoker"] = rng.choice(["yes", "no", "", "no "], rows)
        frame["hospital"] = rng.choice([f"hospital_{k}" for k in range(5)], rows)
        frame["patient"] = [f"P{i:08d}" for i in rng.permutation(rows)]
        frame["y"] = rng.choice(["B", "M"], rows)
    else:
        frame["y"] = rng.integers(0, 2, rows)
    frame.to_csv(folder / "table.csv", index=False)
    (folder / "spec.yaml").write_text(spec_text(features, hospitals))
    return folder / "spec.yaml"


def run_case(folder: Path, rows: int, features: int, hospitals: bool, repeats: int) -> dict:
    """Seconds (wall and CPU) to ingest the case's table (median of `repeats`) and to read it
    with pandas alone."""
    spec = make_table(folder, rows, features, hospitals)
    ingest_s, ingest_cpu_s, read_s = [], [], []
    for r in range(repeats):  # interleaved: the machine's noise hits both alike
        t0 = time.perf_counter()
        pd.read_csv(folder / "table.csv")
        read_s.append(time.perf_counter() - t0)
        t0, c0 = time.perf_counter(), time.process_time()
        run_spec(spec, folder / "corpus", overwrite=r > 0)
        ingest_s.append(time.perf_counter() - t0)
        ingest_cpu_s.append(time.process_time() - c0)
    corpus = Corpus.open(folder / "corpus")
    assert corpus.spec["n_samples"] == rows, "every row becomes a sample"
    med, floor = statistics.median(ingest_s), statistics.median(read_s)
    return {
        "case": f"{rows}x{features}{'h' if hospitals else ''}",
        "rows": rows,
        "features": features,
        "hospitals": hospitals,
        "csv_bytes": (folder / "table.csv").stat().st_size,
        "ingest_s": med,
        "ingest_cpu_s": statistics.median(ingest_cpu_s),
        "ingest_runs_s": ingest_s,
        "read_csv_s": floor,
        "us_per_row": 1e6 * med / rows,
        "over_read_csv": med / floor,
        "origin_sites": corpus.spec["origin_sites"],
    }


def parse_cases(text: str) -> list[tuple[int, int, bool]]:
    """'100000x1,1000000x4h' -> [(rows, features, hospital columns)]."""
    out = []
    for item in text.split(","):
        rows, _, features = item.strip().partition("x")
        hospitals = features.endswith("h")
        out.append((int(rows), int(features.removesuffix("h") or 1), hospitals))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--cases", default=None, help=f"ROWSxFEATURES,... (default {CASES})")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    cases = parse_cases(args.cases or (QUICK_CASES if args.quick else CASES))
    load_before = os.getloadavg()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        run_case(Path(tmp) / "warm-up", 1000, 1, True, 1)  # imports and first calls, outside the timings
        for k, (rows, features, hospitals) in enumerate(cases):
            r = run_case(Path(tmp) / f"case{k}", rows, features, hospitals, args.repeats)
            results.append(r)
            print(
                f"{rows:>9,} rows x {features:>2} features{' (hospital table)' if hospitals else ''}: "
                f"ingest {r['ingest_s']:6.2f} s wall, {r['ingest_cpu_s']:6.2f} s CPU "
                f"({r['us_per_row']:5.1f} us/row), read_csv alone {r['read_csv_s']:5.2f} s "
                f"(ratio {r['over_read_csv']:.1f}x)",
                flush=True,
            )
    one = sorted((r for r in results if r["features"] == 1 and not r["hospitals"]), key=lambda r: r["rows"])
    report: dict = {
        "config": {"cases": [r["case"] for r in results], "repeats": args.repeats, "quick": args.quick},
        "results": results,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "target_s": TARGET_S,
    }
    if len(one) >= 2:
        small, large = one[0], one[-1]
        report["linearity"] = {
            "small_rows": small["rows"],
            "large_rows": large["rows"],
            "row_ratio": large["rows"] / small["rows"],
            "time_ratio": large["ingest_s"] / small["ingest_s"],
            "cpu_ratio": large["ingest_cpu_s"] / small["ingest_cpu_s"],
            "per_row_ratio": large["us_per_row"] / small["us_per_row"],
        }
        lin = report["linearity"]
        print(
            f"linearity: time({large['rows']:,}) / time({small['rows']:,}) = {lin['time_ratio']:.1f} wall, "
            f"{lin['cpu_ratio']:.1f} CPU, for {lin['row_ratio']:.0f}x the rows "
            f"(per-row cost ratio {lin['per_row_ratio']:.2f})"
        )
    million = [r for r in one if r["rows"] == 1_000_000]
    if million:
        report["million_rows_s"] = million[0]["ingest_s"]
        print(
            f"1,000,000 rows x 1 feature: {million[0]['ingest_s']:.1f} s wall, {million[0]['ingest_cpu_s']:.1f} s CPU "
            f"(target < {TARGET_S:g} s)"
        )
    write_result(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
