"""`eeg_edf`: EDF/EDF+ recordings with event annotations, cut into motor-imagery epochs.

    - adapter: eeg_edf
      task: motor_imagery
      path: data/eegmmidb            # one .edf file, or a folder of them (read in sorted order)
      events: {T1: left_hand, T2: right_hand}   # annotation description -> task class;
                                     # annotations not listed are ignored ("769": left_hand, ...)
      events_csv: events.csv         # optional: columns file, onset_s, description, for recordings
                                     # whose events are not in the EDF (then the EDF's are unused)
      channels: [C3, Cz, C4, FC3, FC4, CP3, CPz, CP4]   # as many labels as the modality has
                                     # channels (catalogue eeg: 8); default: the first signals
      epoch_s: 2.0                   # window length (default 2.0)
      offset_s: 0.5                  # window start after the event onset (default 0.0)
      subject_pattern: '^(S\\d+)'    # regex on the file stem: the subject (its `subject` group,
                                     # else its first group, else the whole match); default: the stem
      site_from: subject             # each subject its own site; default: origin_site
      origin_site: lab_a             # the fixed site name (default: the folder's name)
      modality: eeg                  # default: the task's first signal input

The signal modality's declared shape [channels, samples] (catalogue eeg: [8, 128];
`modalities: {eeg: {channels: 22, samples: 512}}` changes it) sets how many channels are read
and how many samples an epoch has. Each matched event becomes one epoch: the selected channels
from onset + offset_s for epoch_s seconds, resampled to the modality's S samples (output sample
j lies at onset + offset_s + j * epoch_s / S s, so the rate becomes S / epoch_s Hz). When that lowers the rate, the
recording is first low-passed at 0.4 x the new rate (a Hamming-windowed sinc FIR, zero phase):
without it, power above the new Nyquist folds back (PhysioNet's 160 Hz recordings cut to 2 s
epochs become 64 Hz, and 60 Hz mains noise would land at 4 Hz). Then linear interpolation, and
standardisation per channel (mean 0, sd 1) so amplifiers' gains do not leak in. The patient
is the subject. Channel labels match exactly, else ignoring case and trailing dots
(PhysioNet's "C3.."). Every problem names the file (and the event's onset): an unreadable,
truncated or corrupt EDF, missing channels, selected channels with different sampling rates,
an epoch outside the recording, NaN samples, a recording without any listed event, a declared
class without epochs.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from federated.core.corpus_schema import CorpusSchema, Task
from federated.core.targets import SIGNAL
from federated.data.ingest.core import (
    Problems,
    SampleSet,
    adapter,
    check_classes,
    error_reason,
    filled_modality,
    kept_inside,
    optional_import,
    read_csv_checked,
    resolve,
)

SITE_FROM = ("origin_site", "subject")
CSV_COLUMNS = ("file", "onset_s", "description")


class _Bad(Exception):
    """A problem with one recording or event; the caller reports it, naming the place."""


def _config(params: dict[str, Any], task: Task, schema: CorpusSchema) -> dict[str, Any]:
    """The source's settings, checked in the order a user fixes them, each refused by its key."""
    modality = filled_modality(task, schema, SIGNAL, params)
    n_channels, length = schema.modality(modality).shape
    events = _events(params, task)
    channels = _channels(params, modality, n_channels)
    epoch_s, offset_s = float(params.get("epoch_s", 2.0)), float(params.get("offset_s", 0.0))
    if not epoch_s > 0:
        raise ValueError(f"epoch_s must be > 0 (got {epoch_s})")
    site_from = _site_from(params)
    return {
        "modality": modality,
        "n_channels": n_channels,
        "length": length,
        "events": events,
        "channels": channels,
        "epoch_s": epoch_s,
        "offset_s": offset_s,
        "site_from": site_from,
        "pattern": _subject_pattern(params),
    }


def _events(params: dict[str, Any], task: Task) -> dict[str, str]:
    """Annotation description -> task class; every class named must be one of the task's."""
    if not params.get("events"):
        raise ValueError("missing key 'events' (annotation description -> task class)")
    events = {str(k).strip(): str(v) for k, v in dict(params["events"]).items()}
    unknown = sorted({v for v in events.values() if v not in task.classes})
    if unknown:
        raise ValueError(f"events map to {unknown}, not classes of {task.name} ({', '.join(task.classes)})")
    return events


def _channels(params: dict[str, Any], modality: str, n_channels: int) -> list[str] | None:
    """The channel labels to select (None: the first signals): exactly the modality's count, no repeats."""
    channels = params.get("channels")
    if channels is not None and len(channels) != n_channels:
        raise ValueError(f"channels lists {len(channels)} labels; the {modality} modality has {n_channels}")
    if channels is not None and len({str(c) for c in channels}) != len(channels):
        raise ValueError(f"channels lists a label twice: {channels}")
    return [str(c) for c in channels] if channels else None


def _site_from(params: dict[str, Any]) -> str:
    """Where a recording's site comes from; a fixed origin_site would contradict per-subject sites."""
    site_from = str(params.get("site_from", "origin_site"))
    if site_from not in SITE_FROM:
        raise ValueError(f"site_from must be one of {', '.join(SITE_FROM)} (got {site_from!r})")
    if site_from == "subject" and params.get("origin_site"):
        raise ValueError("give either origin_site (a fixed name) or site_from: subject, not both")
    return site_from


def _subject_pattern(params: dict[str, Any]) -> re.Pattern[str] | None:
    """The compiled subject_pattern, or None to use the file stem; a bad regex is refused by key."""
    try:
        return re.compile(str(params["subject_pattern"])) if params.get("subject_pattern") else None
    except re.error as e:
        raise ValueError(f"subject_pattern is not a valid regex: {e}") from None


def _recordings(root: Path, data_root: Path, problems: Problems) -> list[Path]:
    """The source's EDF file, or its folder's .edf files (one that leaves the data root is reported)."""
    if root.is_file():
        return [root]
    if not root.is_dir():
        problems.report(root, "EDF file or folder does not exist")
        return []
    listed = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() == ".edf")
    files = kept_inside(listed, data_root, problems)
    if not files:
        problems.report(root, "no .edf files in this folder")
    return files


def _csv_events(path: Path, files: list[Path], problems: Problems) -> dict[str, list[tuple[float, str]]] | None:
    """events_csv -> {recording file name: [(onset_s, description)]}; None if unreadable."""
    if not path.is_file():
        problems.report(path, "events_csv does not exist")
        return None
    frame = read_csv_checked(path, problems, dtype={"file": str, "description": str})
    if frame is None:
        return None
    missing = [c for c in CSV_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: no column(s) {missing} (columns: {', '.join(map(str, frame.columns))})")
    names = {p.name: p.name for p in files} | {p.stem: p.name for p in files}
    events: dict[str, list[tuple[float, str]]] = {}
    for i, (file, onset, desc) in enumerate(frame[list(CSV_COLUMNS)].itertuples(index=False)):
        where = f"{path} row {i + 2}"
        if str(file).strip() not in names:
            problems.report(where, f"file {file!r} is not among the recordings")
        elif not np.isfinite(pd.to_numeric(onset, errors="coerce")):
            problems.report(where, "onset_s is missing or not a number")
        else:
            events.setdefault(names[str(file).strip()], []).append((float(onset), str(desc).strip()))
    return events


def _match_channels(labels: list[str], wanted: list[str] | None, n: int, modality: str) -> list[int]:
    if wanted is None:
        if len(labels) < n:
            raise _Bad(
                f"has {len(labels)} signal channels, the {modality} modality needs {n} "
                f"(its channels: {', '.join(labels)})"
            )
        return list(range(n))
    exact = {lab.strip(): i for i, lab in enumerate(labels)}
    loose = {lab.strip().rstrip(".").lower(): i for i, lab in enumerate(labels)}
    picked = [exact.get(w.strip(), loose.get(w.strip().rstrip(".").lower())) for w in wanted]
    missing = [w for w, i in zip(wanted, picked, strict=True) if i is None]
    if missing:
        raise _Bad(f"channel(s) {missing} not in this recording (its channels: {', '.join(labels)})")
    return [i for i in picked if i is not None]


def _read(path: Path, pyedflib, cfg: dict[str, Any]) -> tuple[np.ndarray, float, list[tuple[float, str]]]:
    """(selected signals [channels, n_samples], sampling rate, annotations [(onset_s, description)])."""
    try:
        reader = pyedflib.EdfReader(str(path))
    except Exception as e:  # pyedflib raises OSError for truncated and corrupt files
        raise _Bad(f"unreadable, truncated or corrupt EDF ({error_reason(e)})") from None
    with reader:
        picked = _match_channels(reader.getSignalLabels(), cfg["channels"], cfg["n_channels"], cfg["modality"])
        rates = [float(reader.getSampleFrequency(i)) for i in picked]
        if len(set(rates)) > 1:
            raise _Bad(f"the selected channels have different sampling rates ({sorted(set(rates))} Hz)")
        signals = np.stack([reader.readSignal(i) for i in picked])
        onsets, _, texts = reader.readAnnotations()
    return signals, rates[0], [(float(t), str(d).strip()) for t, d in zip(onsets, texts, strict=True)]


def low_pass(signals: np.ndarray, rate: float, cutoff_hz: float) -> np.ndarray:
    """Zero-phase FIR low-pass of each channel (windowed sinc, convolved by FFT; numpy has no
    filter design and scipy is not a dependency). The transition band is 0.25 x cutoff wide, so
    everything above 1.25 x cutoff is attenuated by Hamming's ~50 dB. A NaN stays a NaN, and so
    does every sample the filter would smear it into."""
    if signals.shape[1] < 2:  # nothing to filter (and no epoch fits in it anyway)
        return signals
    fc = cutoff_hz / rate  # cycles per sample
    half = int(np.ceil(3.3 / (0.25 * fc) / 2))  # Hamming: transition width ~ 3.3 / taps
    n = np.arange(-half, half + 1)
    taps = 2 * fc * np.sinc(2 * fc * n) * np.hamming(len(n))
    taps /= taps.sum()
    bad = ~np.isfinite(signals)
    clean = np.where(bad, 0.0, signals)
    pad = min(half, signals.shape[1] - 1)
    padded = np.pad(clean, ((0, 0), (pad, pad)), mode="reflect")
    size = padded.shape[1] + len(taps) - 1
    full = np.fft.irfft(np.fft.rfft(padded, size) * np.fft.rfft(taps, size), size)
    out = full[:, half + pad : half + pad + signals.shape[1]]
    if bad.any():
        # "full" then the centred slice: "same" returns max(len(row), len(taps)) samples
        reach = np.stack([np.convolve(row, np.ones(len(taps)))[half : half + len(row)] > 0 for row in bad])
        out = np.where(reach, np.nan, out)
    return out


def epoch(signals: np.ndarray, rate: float, start_s: float, epoch_s: float, length: int) -> np.ndarray:
    """`length` samples from start_s over epoch_s seconds, by linear interpolation, then
    standardised per channel. Raises _Bad when the window leaves the recording."""
    duration = signals.shape[1] / rate
    if start_s < 0 or start_s + epoch_s > duration + 1e-9:
        raise _Bad(f"epoch [{start_s:g}, {start_s + epoch_s:g}] s runs outside the recording (0 to {duration:g} s)")
    pos = (start_s + np.arange(length) * epoch_s / length) * rate  # fractional sample indices
    lo, hi = int(np.floor(pos[0])), min(int(np.ceil(pos[-1])) + 1, signals.shape[1])
    idx = np.arange(lo, hi)
    x = np.stack([np.interp(pos, idx, ch[lo:hi]) for ch in signals])
    if not np.isfinite(x).all():
        raise _Bad("NaN or infinite samples in the epoch")
    return (x - x.mean(axis=1, keepdims=True)) / (x.std(axis=1, keepdims=True) + 1e-6)


def _subject(path: Path, pattern: re.Pattern | None) -> str:
    if pattern is None:
        return path.stem
    match = pattern.search(path.stem)
    if not match:
        raise _Bad(f"file name does not match subject_pattern {pattern.pattern!r}")
    if "subject" in match.groupdict():
        return match.group("subject")
    return match.group(1) if match.groups() else match.group(0)


def _add_epochs(
    samples: SampleSet,
    path: Path,
    signals: np.ndarray,
    rate: float,
    events: list[tuple[float, str]],
    cfg: dict[str, Any],
    meta: tuple[str, str, str],
    problems: Problems,
) -> None:
    """One sample per listed event; meta is (origin site, patient, source)."""
    task = samples.schema.task(samples.task)
    matched = [(t, d) for t, d in events if d in cfg["events"]]
    if not matched:
        seen = len({d for _, d in events})
        problems.report(path, f"no event among {sorted(cfg['events'])} (it has {seen} other kind(s) of event)")
        return
    length = cfg["length"]
    new_rate = length / cfg["epoch_s"]
    if rate > new_rate:
        signals = low_pass(signals, rate, 0.4 * new_rate)
    for onset, desc in matched:
        try:
            x = epoch(signals, rate, onset + cfg["offset_s"], cfg["epoch_s"], length)
        except _Bad as e:
            problems.report(f"{path} event {desc!r} at onset {onset:g} s", str(e))
            continue
        samples.add({cfg["modality"]: x}, task.classes.index(cfg["events"][desc]), *meta)


@adapter(
    "eeg_edf",
    keys={
        "path",
        "events",
        "events_csv",
        "channels",
        "epoch_s",
        "offset_s",
        "origin_site",
        "site_from",
        "subject_pattern",
        "modality",
    },
    fills=SIGNAL,
    paths=frozenset({"path", "events_csv"}),
)
def eeg_edf(params: dict[str, Any], base: Path, problems: Problems, schema: CorpusSchema) -> SampleSet:
    task = schema.task(params["task"])
    cfg = _config(params, task, schema)
    pyedflib = optional_import("pyedflib", "edf")
    root = resolve(base, params)
    samples = SampleSet(task.name, schema)
    files = _recordings(root, base, problems)
    csv_events = _csv_events(resolve(base, params, "events_csv"), files, problems) if params.get("events_csv") else {}
    if csv_events is None:
        return samples
    fixed_site = str(params.get("origin_site") or (root if root.is_dir() else root.parent).name)
    for path in files:
        try:
            subject = _subject(path, cfg["pattern"])
            signals, rate, annotations = _read(path, pyedflib, cfg)
        except _Bad as e:
            problems.report(path, str(e))
            continue
        events = csv_events.get(path.name, []) if params.get("events_csv") else annotations
        site = subject if cfg["site_from"] == "subject" else fixed_site
        _add_epochs(samples, path, signals, rate, events, cfg, (site, subject, f"eeg_edf:{root.name}"), problems)
    check_classes(samples, set(cfg["events"].values()), str(root), problems)
    return samples
