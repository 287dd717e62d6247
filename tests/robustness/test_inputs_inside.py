"""Issue 28, item 7 (settled by "What to build" 6): inputs stay inside.

An ingest spec may come from a coordinator: it reads only inside its data root (the spec's folder,
or --data-root DIR), a path outside is refused naming the key, the path and the root, without the
file being opened, and no error quotes a file's content. `${...}` is refused wherever a user's
value enters, naming the key, with no traceback. A group name is one of conf/<group>/'s files.
"""

from __future__ import annotations

import builtins
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from federated.app.cli import main
from federated.app.studies.spec import StudyError, load_study
from federated.core.config import ConfigError, load_config
from federated.data.format import Corpus
from federated.data.ingest import IngestError
from federated.data.ingest.spec import run_spec

SECRET_LINE = "vm-secret-7431,1"  # the first line of the file outside: a column name if it were read
SECRET_VALUE = "SECRET_VALUE_9026"

TABLE_SOURCE = """sources:
  - adapter: tabular
    task: breast_cancer_classification
    path: {path}
    label_column: diagnosis
    labels: {{B: benign, M: malignant}}
"""


def _breast_csv(path: Path, n: int = 12) -> None:
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(n, 4)), columns=[f"f{i}" for i in range(4)])
    frame["diagnosis"] = ["B", "M"] * (n // 2)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)


@pytest.fixture
def layout(tmp_path):
    """spec/ (where the spec is), outside/secret.csv next to it, data/ elsewhere for --data-root."""
    (tmp_path / "spec").mkdir()
    secret = tmp_path / "outside" / "secret.csv"
    secret.parent.mkdir()
    secret.write_text(f"{SECRET_LINE}\nroot:x:0:0:root:/root:/bin/bash,0\n")
    return tmp_path


@pytest.fixture
def opened(monkeypatch):
    """The real paths every file open, pandas reader and os.open was asked for during the test."""
    seen: list[str] = []

    def spy(real):
        def wrapper(file, *args, **kwargs):
            if isinstance(file, str | bytes | os.PathLike):
                seen.append(os.path.realpath(os.fsdecode(file)))
            return real(file, *args, **kwargs)

        return wrapper

    monkeypatch.setattr(builtins, "open", spy(builtins.open))
    monkeypatch.setattr(os, "open", spy(os.open))
    monkeypatch.setattr(pd, "read_csv", spy(pd.read_csv))
    monkeypatch.setattr(pd, "read_parquet", spy(pd.read_parquet))
    return seen


def _refused(spec: Path, out: Path, **kwargs) -> str:
    with pytest.raises(IngestError) as caught:
        run_spec(spec, out, **kwargs)
    assert not out.exists()
    return str(caught.value)


# ------------------------------------------------------------------ ingest paths stay inside


@pytest.mark.parametrize(
    "path",
    ["../../../../../../../../../../etc/passwd", "/etc/hostname", "../outside/secret.csv", "{secret}"],
)
def test_an_ingest_path_outside_the_spec_folder_is_refused_unopened(layout, opened, path):
    """The issue's probes (`../../../../etc/passwd`, `/etc/hostname`) and a file of known content
    beside the spec folder, by relative and by absolute path."""
    secret = layout / "outside" / "secret.csv"
    path = path.format(secret=secret)
    spec = layout / "spec" / "spec.yaml"
    spec.write_text(TABLE_SOURCE.format(path=path))
    message = _refused(spec, layout / "corpus")
    target = os.path.realpath(layout / "spec" / path)
    assert "sources[0]: `path`" in message and path in message  # the key and the path
    assert f"outside the data root {os.path.realpath(layout / 'spec')}" in message  # the allowed root
    assert "--data-root" in message
    assert target not in opened  # refused before anything opened it
    assert SECRET_LINE not in message and "root:x:0:0" not in message and "columns:" not in message


def test_a_symlink_inside_the_spec_folder_that_points_out_is_refused(layout, opened):
    secret = layout / "outside" / "secret.csv"
    (layout / "spec" / "link.csv").symlink_to(secret)
    spec = layout / "spec" / "spec.yaml"
    spec.write_text(TABLE_SOURCE.format(path="link.csv"))
    message = _refused(spec, layout / "corpus")
    assert f"(real path {secret})" in message and "`path`: link.csv" in message
    assert str(secret) not in opened and SECRET_LINE not in message


def test_a_spec_data_root_outside_its_folder_is_refused(layout, opened):
    spec = layout / "spec" / "spec.yaml"
    spec.write_text("data_root: ../outside\n" + TABLE_SOURCE.format(path="secret.csv"))
    message = _refused(spec, layout / "corpus")
    assert "`data_root`: ../outside lies outside the spec's folder" in message and "--data-root" in message
    assert str(layout / "outside" / "secret.csv") not in opened


def test_a_file_a_csv_lists_outside_the_data_root_is_not_opened(layout, opened):
    """An image name in a labels CSV (`../outside/x.png`) is refused at its row, unopened."""
    from PIL import Image

    rng = np.random.default_rng(0)
    images = layout / "spec" / "hand"
    images.mkdir()
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(images / f"{i}.png")
    escaping = layout / "outside" / "x.png"
    escaping.write_bytes((images / "0.png").read_bytes())
    names = ["0.png", "1.png", "../../outside/x.png", "3.png"]
    pd.DataFrame({"id": names, "months": [10, 20, 30, 40]}).to_csv(layout / "spec" / "ages.csv", index=False)
    spec = layout / "spec" / "spec.yaml"
    spec.write_text(
        "sources:\n  - {adapter: images_csv, task: bone_age, path: hand, labels: ages.csv, "
        "image_column: id, label_column: months}\n"
    )
    message = _refused(spec, layout / "corpus")
    assert "ages.csv row 4" in message and "outside the data root" in message and "not opened" in message
    assert "x.png" not in message  # the cell is not quoted
    assert str(escaping) not in opened


def test_a_path_inside_the_data_root_is_read(layout, capsys):
    """The way in that stays: --data-root names a folder anywhere; relative and absolute paths
    inside it are read (the spec's own folder is then not a data root)."""
    data = layout / "data"
    _breast_csv(data / "sub" / "wdbc.csv")
    spec = layout / "spec" / "spec.yaml"
    for path in ("sub/wdbc.csv", str(data / "sub" / "wdbc.csv")):
        spec.write_text(TABLE_SOURCE.format(path=path))
        out = layout / f"corpus{len(path)}"
        code = main(["corpus", "ingest", str(spec), "--data-root", str(data), "--out", str(out)])
        assert code == 0, capsys.readouterr().err
        assert len(Corpus.open(out).manifest) == 12
    spec.write_text(TABLE_SOURCE.format(path="../outside/secret.csv"))  # relative to the data root now
    assert main(["corpus", "ingest", str(spec), "--data-root", str(data), "--out", str(layout / "no")]) == 2
    err = capsys.readouterr().err
    assert f"outside the data root {data}" in err and SECRET_LINE not in err


def test_no_ingest_error_quotes_a_cell(layout):
    """A label outside the task's classes is named by file, row and column, not by its value."""
    csv = layout / "spec" / "wdbc.csv"
    _breast_csv(csv)
    frame = pd.read_csv(csv)
    frame.loc[3, "diagnosis"] = SECRET_VALUE
    frame.to_csv(csv, index=False)
    spec = layout / "spec" / "spec.yaml"
    spec.write_text(TABLE_SOURCE.format(path="wdbc.csv"))
    message = _refused(spec, layout / "corpus")
    assert "wdbc.csv row 5: label (diagnosis) is not a class" in message and SECRET_VALUE not in message
    csv.write_bytes(b"\xff\xfe" + SECRET_VALUE.encode("utf-16-le"))  # not a table: no bytes quoted
    message = _refused(spec, layout / "corpus")
    assert "unreadable" in message and SECRET_VALUE not in message and "\\x" not in message


def test_an_ingest_spec_with_an_interpolation_is_refused(layout):
    spec = layout / "spec" / "spec.yaml"
    spec.write_text(TABLE_SOURCE.format(path="'${oc.env:HOME}'"))
    message = _refused(spec, layout / "corpus")
    assert "sources[0].path: `${...}` interpolation is not allowed" in message


# ------------------------------------------------------------------ ${...} and group names


def test_an_interpolated_override_is_refused_by_the_cli_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home-of-SECRET_VALUE_9026"))
    for argv in (["config", "show"], ["run", "--out", str(tmp_path / "run"), "--no-progress"]):
        code = main([*argv, "rounds=${oc.env:HOME}"])
        err = capsys.readouterr().err
        assert code == 2, err
        assert err.count("\n") == 1 and "rounds: `${...}` interpolation is not allowed" in err
        assert SECRET_VALUE not in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match=r"sites\.train: `\$\{\.\.\.\}` interpolation"):
        load_config(["sites.train=[a, '${rounds}']"])


@pytest.mark.slow  # starts the CLI as a process, as a user types it
@pytest.mark.parametrize("command", ["config show", "run"])
def test_the_real_cli_refuses_an_interpolated_override(tmp_path, command):
    home = tmp_path / "home-of-SECRET_VALUE_9026"
    argv = command.split() + (["--out", str(tmp_path / "run"), "--no-progress"] if command == "run" else [])
    result = subprocess.run(
        [sys.executable, "-m", "federated.app.cli", *argv, "rounds=${oc.env:HOME}"],
        capture_output=True,
        text=True,
        env={**os.environ, "HOME": str(home)},
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "rounds: `${...}` interpolation is not allowed" in lines[0], result.stderr
    assert SECRET_VALUE not in result.stderr + result.stdout and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("body", "key"),
    [
        ("base: ['rounds=${oc.env:HOME}']\n", "base[0]"),
        ("quick: [scale=smoke, 'rounds=${oc.env:HOME}']\n", "quick[1]"),
        ("axes:\n  rate:\n    low: ['sites.missing_sample_rate=${oc.env:HOME}']\n", "axes.rate.low[0]"),
    ],
)
def test_a_study_file_with_an_interpolation_is_refused(tmp_path, capsys, body, key):
    study = tmp_path / "mine.yaml"
    study.write_text("name: mine\n" + body)
    with pytest.raises(StudyError) as caught:
        load_study(str(study))
    assert str(caught.value).startswith(f"{study}: {key}: `${{...}}` interpolation is not allowed")
    assert main(["study", str(study), "--out", str(tmp_path / "out")]) == 2
    assert f"{study}: {key}" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("override", "group", "choices"),
    [
        ("scale=../scale/smoke", "scale", "default, smoke"),
        ("corpus=ingest/real_mini", "corpus", "synthetic"),
        ("strategy=/etc/passwd", "strategy", "fedavg"),
        ("privacy=../privacy/dp_sgd", "privacy", "dp_fedavg, dp_sgd, none"),
    ],
)
def test_a_group_name_is_one_of_its_folders_files(tmp_path, capsys, override, group, choices):
    with pytest.raises(ConfigError, match=f"unknown {group} '{override.split('=', 1)[1]}'; choices: .*{choices}"):
        load_config([override])
    assert main(["config", "show", override]) == 2
    assert f"unknown {group}" in capsys.readouterr().err


def test_a_conf_folder_with_an_interpolation_or_a_path_default_is_refused(tmp_path):
    """$MULTIMED_FL_CONF may be a user's own conf/: its files and its defaults list obey the same rules."""
    from federated.core.config.merge import conf_dir

    shipped = conf_dir()
    mine = tmp_path / "conf"
    for group in ("corpus", "sites", "model", "strategy", "privacy", "engine", "secure_aggregation", "scale"):
        (mine / group).mkdir(parents=True)
        for f in (shipped / group).glob("*.yaml"):
            (mine / group / f.name).write_text(f.read_text())
    top = (shipped / "config.yaml").read_text()
    (mine / "config.yaml").write_text(top.replace("rounds: 20", "rounds: ${oc.env:HOME}"))
    with pytest.raises(ConfigError, match=r"config\.yaml: rounds: `\$\{\.\.\.\}` interpolation"):
        load_config([], root=mine)
    assert "rounds: 20" in top and "  sites: default" in top
    (mine / "config.yaml").write_text(top.replace("  sites: default", "  sites: ../sites/default"))
    with pytest.raises(ConfigError, match=r"unknown sites '\.\./sites/default'; choices: default"):
        load_config([], root=mine)


def test_a_serialised_config_with_an_interpolation_in_a_key_is_refused_naming_it():
    """A config read back from a run folder or sent to a site is checked with the one literal
    helper (federated/core/literal.py): keys too, not only values."""
    from federated.core.config.serialisation import config_from_yaml, config_to_yaml

    text = config_to_yaml(load_config([]))
    assert config_from_yaml(text) == load_config([])
    keyed = text.replace("sites:\n", "sites:\n  ${oc.env:HOME}: 1\n", 1)
    with pytest.raises(ConfigError) as caught:
        config_from_yaml(keyed)
    message = str(caught.value)
    assert message.startswith("sites.${oc.env:HOME}: interpolation '${oc.env:HOME}' is not allowed in a serialised")
    assert os.environ.get("HOME", "/nonexistent-home") not in message
