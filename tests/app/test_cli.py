"""The corpus and config commands, as a user types them."""

from federated.app.cli import main


def test_corpus_build_then_info(tmp_path, capsys):
    out = tmp_path / "corpus"
    assert main(["corpus", "build", "--out", str(out), "corpus.samples_per_task_site=6"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert "wrote synthetic corpus" in text and "660 samples" in text  # 11 tasks x 10 sites x 6
    assert main(["corpus", "info", str(out)]) == 0
    info = " ".join(capsys.readouterr().out.split())
    for word in ("medical_vqa", "protein_sequence", "11 tasks", "10 origin sites"):
        assert word in info
    # building over it again is refused, with the reason
    assert main(["corpus", "build", "--out", str(out), "corpus.samples_per_task_site=6"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_corpus_info_on_a_folder_that_is_not_a_corpus(tmp_path, capsys):
    assert main(["corpus", "info", str(tmp_path)]) == 2
    assert "is not a corpus" in capsys.readouterr().err


def test_config_show_prints_the_resolved_yaml(capsys):
    assert main(["config", "show", "scale=smoke", "seed=5"]) == 0
    text = capsys.readouterr().out
    assert "seed: 5" in text and "scale: smoke" in text and "samples_per_task_site: 20" in text


def test_sites_show_writes_the_plan_and_a_heatmap(tmp_path, capsys):
    import pandas as pd

    assert main(["sites", "show", "--out", str(tmp_path), "scale=smoke", "sites.label_skew_alpha=0.1"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "site_09" in out and "eye_clinic" in out and "top class" in out
    frame = pd.read_parquet(tmp_path / "sites.parquet")
    assert len(frame) == 10 and list(frame["role"]).count("held_out") == 2
    png = (tmp_path / "sites_heatmap.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
