"""Ingest and read throughput: images per second into a corpus, samples per second out of it.

Ingest: N JPEG images (H x W, two class folders) go through `run_spec` with the image_folders
adapter (decode, grey, resize to 32x32, standardise, validate, write the corpus atomically).
Side by side, in the same run, the floor: PIL decoding and resizing the same files and nothing
else. The ratio is what validation, bookkeeping and writing cost on top of decoding.

Read: from the corpus just written, batches of 32 random rows gathered from the memory-mapped
array (what SiteData does when a site loads its rows), against the same gather from an
in-memory copy of the array (the floor); and a whole site loaded through SiteData (arrays,
targets, tensors), in samples per second.

Single-cell memory (needs the `h5ad` extra): an .h5ad of C cells x G genes ingested by the h5ad
adapter, which reads the file backed, block by block; its peak traced memory (tracemalloc sees
numpy's buffers) side by side with the peak of anndata reading the same file whole, the floor
of any adapter that loads the matrix. Cells per second too.

    python experiments/bench/ingest.py [--quick] [--out results.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from clients.site_data import SiteData
from federated.app.bench import write_result
from federated.core.config import load_config
from federated.data.format import Corpus
from federated.data.ingest.spec import run_spec
from partitions import plan_sites

SPEC = """name: bench
sources:
  - adapter: image_folders
    task: brain_tumor_detection
    path: images
    classes: {"no": no_tumor, "yes": tumor}
    simulated_sites: 4
"""


def make_images(root: Path, n: int, size: tuple[int, int], seed: int) -> list[Path]:
    """JPEGs with smooth structure plus noise (compress like scans, not like pure noise)."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    files = []
    for i in range(n):
        label = "yes" if i % 2 else "no"
        (root / label).mkdir(parents=True, exist_ok=True)
        blob = np.exp(-((yy - rng.uniform(0.3, 0.7)) ** 2 + (xx - rng.uniform(0.3, 0.7)) ** 2) / 0.02)
        img = np.clip(120 + 80 * blob + rng.normal(0, 12, (h, w)), 0, 255).astype(np.uint8)
        path = root / label / f"{label}{i:05d}.jpg"
        Image.fromarray(img).save(path, quality=90)
        files.append(path)
    return files


def decode_floor(files: list[Path]) -> float:
    t0 = time.perf_counter()
    for f in files:
        with Image.open(f) as img:
            np.asarray(img.convert("L").resize((32, 32), Image.BILINEAR), dtype=np.float32)
    return time.perf_counter() - t0


def gather_rate(array: np.ndarray, batches: int, rng: np.random.Generator) -> float:
    """Samples per second gathering sorted random batches of 32 rows."""
    idx = [np.sort(rng.choice(len(array), 32, replace=False)) for _ in range(batches)]
    t0 = time.perf_counter()
    total = 0.0
    for b in idx:
        total += float(np.asarray(array[b]).sum())  # force the read
    return 32 * batches / (time.perf_counter() - t0)


H5AD_SPEC = """name: bench_cells
sources:
  - adapter: h5ad
    task: cell_type
    path: cells.h5ad
    label_key: cell_type
    classes: {a: type_0, b: type_1}
    simulated_sites: 2
"""


def traced_peak(fn) -> tuple[float, int]:
    """(seconds, peak bytes traced) of one call."""
    import tracemalloc

    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        fn()
        return time.perf_counter() - t0, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def h5ad_memory(tmp: Path, cells: int, genes: int) -> dict | None:
    try:
        import anndata
        import pandas as pd
    except ImportError:
        print("single-cell memory: skipped (pip install 'multimed-fl[h5ad]')")
        return None
    rng = np.random.default_rng(1)
    x = rng.normal(size=(cells, genes)).astype(np.float32)
    obs = pd.DataFrame({"cell_type": np.where(np.arange(cells) % 2, "a", "b")}, index=[f"c{i}" for i in range(cells)])
    anndata.AnnData(x, obs=obs).write_h5ad(tmp / "cells.h5ad")
    del x
    (tmp / "cells.yaml").write_text(H5AD_SPEC)
    ingest_s, ingest_peak = traced_peak(lambda: run_spec(tmp / "cells.yaml", tmp / "cells_corpus"))
    whole_s, whole_peak = traced_peak(lambda: anndata.read_h5ad(tmp / "cells.h5ad"))
    report = {
        "h5ad_cells": cells,
        "h5ad_genes": genes,
        "h5ad_matrix_bytes": cells * genes * 4,
        "h5ad_ingest_peak_bytes": ingest_peak,
        "h5ad_read_whole_peak_bytes": whole_peak,
        "h5ad_peak_over_read_whole": ingest_peak / whole_peak,
        "h5ad_ingest_cells_per_s": cells / ingest_s,
        "h5ad_read_whole_s": whole_s,
    }
    print(
        f"ingest an .h5ad of {cells:,} cells x {genes:,} genes ({cells * genes * 4 / 2**20:.0f} MiB float32): "
        f"{report['h5ad_ingest_cells_per_s']:,.0f} cells/s, peak {ingest_peak / 2**20:.0f} MiB traced vs "
        f"{whole_peak / 2**20:.0f} MiB for anndata reading it whole (ratio {report['h5ad_peak_over_read_whole']:.2f})"
    )
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--size", type=int, default=None, help="image side in pixels")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    n = args.images or (300 if args.quick else 3000)
    side = args.size or (96 if args.quick else 256)
    repeats = 1 if args.quick else args.repeats
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = make_images(tmp / "images", n, (side, side), 0)
        (tmp / "spec.yaml").write_text(SPEC)
        ingest_s, floor_s = [], []
        for r in range(repeats):  # interleaved: the machine's noise hits both alike
            floor_s.append(decode_floor(files))
            t0 = time.perf_counter()
            run_spec(tmp / "spec.yaml", tmp / "corpus", overwrite=r > 0)
            ingest_s.append(time.perf_counter() - t0)
        corpus = Corpus.open(tmp / "corpus")
        mmapped = corpus.array("mri")
        in_ram = np.array(mmapped)
        batches = 200 if args.quick else 2000
        mmap_rate = statistics.median(gather_rate(mmapped, batches, rng) for _ in range(repeats))
        ram_rate = statistics.median(gather_rate(in_ram, batches, rng) for _ in range(repeats))
        cfg = load_config(
            [f"corpus.path={tmp / 'corpus'}", "sites.planner=natural", "sites.min_site_size=1", "sites.min_samples=1"]
        )
        site = plan_sites(corpus, cfg)[0]
        load_times, loaded = [], 0
        for _ in range(repeats):
            t0 = time.perf_counter()
            data = SiteData(corpus, site)
            load_times.append(time.perf_counter() - t0)
            loaded = data.n("train") + data.n("test")
        cells_report = h5ad_memory(tmp, *((2_000, 1_000) if args.quick else (40_000, 2_000)))
    ingest_med, floor_med = statistics.median(ingest_s), statistics.median(floor_s)
    report = {
        "config": {"images": n, "side": side, "repeats": repeats, "quick": args.quick},
        "ingest_images_per_s": n / ingest_med,
        "decode_floor_images_per_s": n / floor_med,
        "ingest_over_decode": ingest_med / floor_med,
        "ingest_s": ingest_s,
        "decode_s": floor_s,
        "read_mmap_samples_per_s": mmap_rate,
        "read_ram_samples_per_s": ram_rate,
        "mmap_over_ram_time": ram_rate / mmap_rate,
        "site_load_samples_per_s": loaded / statistics.median(load_times),
        "site_samples": loaded,
    }
    print(
        f"ingest {n} JPEGs of {side}x{side}: {report['ingest_images_per_s']:.0f} images/s "
        f"(decode+resize alone {report['decode_floor_images_per_s']:.0f}/s; ratio {report['ingest_over_decode']:.2f}x)"
    )
    print(
        f"read batches of 32 random rows: memory-mapped {mmap_rate:,.0f} samples/s, in RAM {ram_rate:,.0f} "
        f"samples/s (time ratio {report['mmap_over_ram_time']:.2f}x); one site through SiteData "
        f"{report['site_load_samples_per_s']:,.0f} samples/s ({loaded} samples)"
    )
    report.update(cells_report or {})
    write_result(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
