"""`vqa`: medical visual question answering records, as JSON (a list of objects) or JSONL.

    - adapter: vqa
      task: medical_vqa
      path: data/vqa/train.jsonl      # .jsonl / .ndjson: one object per line; else a JSON list
      images: data/vqa/images         # image paths are relative to it (default: the file's folder)
      image_key: image                # the defaults
      question_key: question
      answer_key: answer
      answers: {"none": "0", "one": "1"}   # source answer -> task answer (default: the same)
      patient_key: patient            # default: the image path (a patient per image)
      site_key: hospital              # becomes origin_site (natural sites)
      origin_site: vqa_rad            # without site_key; default: the file's name, less its suffix
      modality: xray                  # default: the task's first image input

The image is read as in image_folders (the modality's declared shape, standardised); the
question is tokenised into the task's text input (`text`, or a tokens modality the spec declares;
federated/data/ingest/text.py) at its declared length and vocabulary; the answer is matched
case-insensitively against the task's closed answer set (medical_vqa: no, yes, 0..4), so an
open-ended answer outside it is an error: keep closed questions only, or map the answers.
The default patient is the image, so all questions about one image land on the same side of
the by-patient split. Problems name the file and the JSONL line (1-based) or the JSON list
index (0-based, `file [i]`): an unparsable line, a record that is not an object, a missing
key, an empty question, an unknown answer, a missing image (at its record) or a corrupt one
(by its path).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from federated.core.corpus_schema import CorpusSchema, Modality, Task
from federated.core.targets import CLOSED_SET, IMAGE
from federated.data.ingest.core import Problems, SampleSet, adapter, check_classes, error_reason, kept_inside, resolve
from federated.data.ingest.image_folders import image_modality
from federated.data.ingest.images_csv import BadItem, read_image
from federated.data.ingest.text import text_modality, tokenize, words

JSONL_SUFFIXES = {".jsonl", ".ndjson"}
DEFAULT_KEYS = {"image": "image", "question": "question", "answer": "answer"}


@adapter(
    "vqa",
    keys={
        "path",
        "images",
        "image_key",
        "question_key",
        "answer_key",
        "answers",
        "patient_key",
        "site_key",
        "origin_site",
        "modality",
    },
    fills=IMAGE,
    paths=frozenset({"path", "images"}),
)
def vqa(params: dict[str, Any], base: Path, problems: Problems, schema: CorpusSchema) -> SampleSet:
    task = schema.task(params["task"])
    if task.target != CLOSED_SET:
        raise ValueError(f"vqa needs a closed-set task with a text input, not {task.name}")
    text = text_modality(task, schema)
    modality = image_modality(task, schema, params)
    shape = schema.modality(modality).shape
    path = resolve(base, params, "path")
    images = resolve(base, params, "images") if params.get("images") is not None else path.parent
    keys = {role: str(params.get(f"{role}_key") or k) for role, k in DEFAULT_KEYS.items()}
    keys.update({role: str(params[f"{role}_key"]) for role in ("patient", "site") if params.get(f"{role}_key")})
    lookup = _answer_lookup(task, params.get("answers"))
    site = str(params.get("origin_site") or path.stem)
    samples = SampleSet(task.name, schema)
    cache: dict[str, np.ndarray | None] = {}
    for where, record in _records(path, problems):
        try:
            fields = _fields(record, keys)
            label = _answer(fields["answer"], lookup, task)
            question = _question(fields["question"], text)
        except BadItem as e:
            problems.report(where, str(e))
            continue
        image = images / fields["image"]
        if not kept_inside([image], base, problems, f"{where} ({keys['image']})"):  # a record may hold ../
            continue
        x = cache.get(image)
        if x is None:
            x = cache[image] = read_image(image, shape, problems, where)
        if x is None:
            continue
        samples.add(
            {modality: x, text.name: question},
            label,
            fields.get("site", site),
            fields.get("patient", fields["image"]),
            f"vqa:{path.name}",
        )
    declared = {str(v) for v in dict(params.get("answers") or {}).values()}  # mapped answers need samples
    check_classes(samples, declared, str(path), problems)
    return samples


def _answer_lookup(task: Task, answers: Any) -> dict[str, str]:
    """lowercased answer -> task answer: the task's own answers, then the `answers:` map."""
    lookup = {c.lower(): c for c in task.classes}
    for source, target in dict(answers or {}).items():
        if str(target) not in task.classes:
            raise ValueError(f"answers: {target!r} is not an answer of {task.name} ({', '.join(task.classes)})")
        lookup[_text(source).lower()] = str(target)
    return lookup


def _text(value: Any) -> str:
    """A JSON scalar as text: 3 and 3.0 both read "3"."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def _answer(value: Any, lookup: dict[str, str], task: Task) -> int:
    answer = _text(value)
    if answer.lower() not in lookup:
        raise BadItem(f"answer is not an answer of {task.name} ({', '.join(task.classes)}); map it with `answers:`")
    return task.classes.index(lookup[answer.lower()])


def _question(value: Any, text: Modality) -> np.ndarray:
    if not isinstance(value, str) or not words(value):
        raise BadItem("question is empty or not text")
    return tokenize(value, text)


def _fields(record: Any, keys: dict[str, str]) -> dict[str, Any]:
    """role -> the record's value; a record that lacks one is a BadItem."""
    if not isinstance(record, dict):
        raise BadItem(f"record is a {type(record).__name__}, not a JSON object")
    missing = [k for k in keys.values() if record.get(k) is None]
    if missing:
        raise BadItem(f"record has no {', '.join(map(repr, missing))} key (keys: {', '.join(map(str, record))})")
    out = {role: record[k] for role, k in keys.items()}
    for role in ("image", "patient", "site"):
        if role in out:
            out[role] = _text(out[role])
    return out


def _records(path: Path, problems: Problems) -> list[tuple[str, Any]]:
    """(where, parsed record) for each record of the file."""
    if not path.is_file():
        problems.report(path, "VQA file does not exist")
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        problems.report(path, f"unreadable file ({error_reason(e)})")
        return []
    if path.suffix.lower() in JSONL_SUFFIXES:
        return _jsonl(path, text, problems)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        problems.report(path, f"not valid JSON ({e})")
        return []
    if not isinstance(data, list):
        problems.report(path, "expected a JSON list of records (or one record per line in a .jsonl file)")
        return []
    return [(f"{path} [{i}]", record) for i, record in enumerate(data)]


def _jsonl(path: Path, text: str, problems: Problems) -> list[tuple[str, Any]]:
    out = []
    for n, line in enumerate(text.split("\n"), start=1):  # not splitlines: JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            out.append((f"{path} line {n}", json.loads(line)))
        except json.JSONDecodeError as e:
            problems.report(f"{path} line {n}", f"unparsable JSON ({e.msg} at column {e.colno})")
    return out
