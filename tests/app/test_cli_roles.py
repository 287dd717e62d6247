"""`sites show` labels roles as the run's summary and tables do (federated.core.protocol.Role)."""

from __future__ import annotations

from federated.app.cli import main


def test_sites_show_labels_a_site_that_does_not_train_as_id_eval(tmp_path, capsys):
    assert (
        main(
            [
                "sites",
                "show",
                "--out",
                str(tmp_path),
                "scale=smoke",
                "sites.train_only=[site_00]",
                "sites.zero_shot=true",
            ]
        )
        == 0
    )
    rows = {
        line.split("│")[1].strip(): line.split("│")[2].strip()
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("│ site_")
    }
    assert rows["site_00"] == "ID" and rows["site_01"] == "ID (eval)" and rows["site_09"] == "OOD"
