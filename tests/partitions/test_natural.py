"""Natural sites: one per origin site, named after it, small origins grouped up to the minimum size."""

import logging

import numpy as np
import pytest
from flwr.common.config import parse_config_args

from federated.core.config import load_config
from federated.engines.deployment.federation import node_config_string
from partitions import PlanError, natural, plan_sites
from partitions.natural import MAX_SITE_NAME, group_site_name, group_small_origins, site_name
from partitions.report import plan_frame
from partitions.site_local import site_corpus_folders

NATURAL = ["sites.planner=natural", "sites.holdout=named"]


def test_grouping_keeps_big_origins_and_merges_small_ones_in_name_order():
    sizes = {"A": 100, "B": 10, "C": 30, "D": 25, "E": 5, "F": 60}
    assert group_small_origins(sizes, 50) == [["A"], ["F"], ["B", "C", "D", "E"]]
    assert group_small_origins(sizes, 20) == [["A"], ["C"], ["D"], ["F"], ["B", "E"]]


def test_sites_are_disjoint_cover_each_origin_and_hold_out_by_origin_name(manifest_corpus):
    sizes = {"KY": 300, "MN": 200, "MS": 150, "NY": 20, "TX": 40}
    corpus = manifest_corpus(sizes)
    cfg = load_config([*NATURAL, "sites.holdout_sites=[MS]", "sites.min_site_size=50"])
    plans = plan_sites(corpus, cfg)
    assert [p.origin_site for p in plans] == ["KY", "MN", "MS", "NY+TX"]
    assert [p.site for p in plans] == ["KY", "MN", "MS", "NY+TX"]  # each site keeps its hospital's name
    assert [p.role for p in plans] == ["train", "train", "held_out", "train"]
    m = corpus.manifest
    seen = np.concatenate([np.concatenate([p.train_rows, p.test_rows]) for p in plans])
    assert len(seen) == len(set(seen.tolist())) == len(m)  # disjoint and covering
    for p in plans:
        rows = np.concatenate([p.train_rows, p.test_rows])
        assert set(m["origin_site"].iloc[rows]) == set(p.origin_site.split("+"))
        assert set(m["task"].iloc[rows]) == set(p.tasks)
        if p.role == "train":
            assert (m["split"].iloc[p.train_rows] == "train").all()
    held = plans[2]
    assert held.n_train == 0 and held.n_test == sizes["MS"]


def test_too_small_even_grouped_is_refused_naming_the_key_the_origins_and_the_way_out(manifest_corpus):
    corpus = manifest_corpus({"KY": 300, "NY": 20, "TX": 10})
    with pytest.raises(
        PlanError,
        match=r"^sites\.min_site_size=50: origin sites NY \(20 samples\) and TX \(10 samples\) are smaller, and "
        r"grouped have only 30 samples, so they are refused; sites\.min_site_size=10 or lower keeps each as its own "
        r"site, 30 keeps them as one site NY\+TX$",
    ):
        plan_sites(corpus, load_config([*NATURAL, "sites.holdout_sites=[KY]", "sites.min_site_size=50"]))
    # a 46-patient hospital alone under the default minimum of 50
    with pytest.raises(
        PlanError,
        match=r"^sites\.min_site_size=50: origin site lakeview \(46 samples\) is smaller and no other origin site "
        r"is small enough to be grouped with it, so it is refused; sites\.min_site_size=46 or lower keeps it",
    ):
        plan_sites(manifest_corpus({"KY": 300, "lakeview": 46}), load_config(["sites.planner=natural"]))
    lowered = plan_sites(
        manifest_corpus({"KY": 300, "lakeview": 46}), load_config(["sites.planner=natural", "sites.min_site_size=46"])
    )
    assert [p.site for p in lowered] == ["KY", "lakeview"]


def test_grouping_is_said_once_naming_the_key_and_which_origins_went_together(manifest_corpus, caplog, monkeypatch):
    monkeypatch.setattr(natural, "_TOLD", set())  # what this process has said so far
    corpus = manifest_corpus({"KY": 300, "lakeview": 46, "riverside": 20})
    cfg = load_config(["sites.planner=natural"])
    with caplog.at_level(logging.WARNING, logger="partitions.natural"):
        plans = plan_sites(corpus, cfg)
        plan_sites(corpus, cfg)  # every process plans the same sites: said once
    assert [(p.site, p.origin_site) for p in plans] == [("KY", "KY"), ("lakeview+riverside", "lakeview+riverside")]
    said = [r.getMessage() for r in caplog.records if r.name == "partitions.natural"]
    assert said == [
        "sites.min_site_size=50: origin sites lakeview (46 samples) and riverside (20 samples) are each smaller, so "
        "they train and are scored as one site, lakeview+riverside (66 samples); sites.min_site_size=20 or lower "
        "keeps each as its own site"
    ]


def test_without_a_holdout_every_natural_site_trains(manifest_corpus):
    corpus = manifest_corpus({"KY": 300, "MN": 200})
    plans = plan_sites(corpus, load_config(["sites.planner=natural"]))
    assert [p.role for p in plans] == ["train", "train"]


def test_hold_out_by_the_new_names_and_a_grouped_origin_names_its_group(manifest_corpus):
    corpus = manifest_corpus({"KY": 300, "MN": 200, "NY": 20, "TX": 40})
    base = [*NATURAL, "sites.min_site_size=50"]
    held = plan_sites(corpus, load_config([*base, "sites.holdout_sites=[MN,NY+TX]"]))
    assert [(p.site, p.role) for p in held] == [("KY", "train"), ("MN", "held_out"), ("NY+TX", "held_out")]
    with pytest.raises(PlanError, match=r"origin site TX, which sites.min_site_size=50 grouped into site NY\+TX"):
        plan_sites(corpus, load_config([*base, "sites.holdout_sites=[TX]"]))
    # the old numbers are not names: site_01 was whichever origin sorted second
    with pytest.raises(
        PlanError,
        match=r"unknown sites \['site_01'\]; planned sites: KY, MN, NY\+TX; natural sites are named after their "
        r"origin sites, not numbered",
    ):
        plan_sites(corpus, load_config([*base, "sites.holdout_sites=[site_01]"]))


UNSAFE = {
    "St Mary's": "St_Mary_s",  # a space and a quote break a Flower node config
    "A+E": "A_E",  # '+' joins a group's members
    "north/south": "north_south",  # a folder separator
    ".hidden": "hidden",  # a hidden folder is not listed as a site corpus
    "-x": "x",  # looks like a command-line option
    "007": "site_007",  # a config list reads 007 as 7
    "yes": "site_yes",  # ... yes as true
    "null": "site_null",
    "1e3": "site_1e3",
    "73": "73",  # read as 73 and kept: a number that reads back as itself
    "Köln": "Köln",  # letters of any script stay
    "Ko\u0308ln": "Köln",  # the same name decomposed: one name
    "KY": "KY",
}


@pytest.mark.parametrize("origin", sorted(UNSAFE))
def test_an_origin_name_becomes_a_safe_recognisable_site_name(origin, tmp_path):
    name = site_name(origin)
    assert name == UNSAFE[origin]
    # a config list entry reads back as the name
    assert load_config([*NATURAL, f"sites.holdout_sites=[{name}]"]).sites.holdout_sites == [name]
    # a SuperNode's --node-config carries it unchanged
    assert parse_config_args([node_config_string({"site": name})]) == {"site": name}
    # a folder of that name is a site corpus folder of that name
    (tmp_path / name).mkdir()
    (tmp_path / name / "spec.json").write_text("{}")
    assert list(site_corpus_folders(tmp_path)) == [name]


def test_unsafe_names_reach_the_plan_and_both_names_hold_out_a_site(manifest_corpus):
    corpus = manifest_corpus({"St Mary's": 120, "007": 80, "KY": 90})
    cfg = load_config(["sites.planner=natural"])
    plans = plan_sites(corpus, cfg)
    assert [(p.site, p.origin_site) for p in plans] == [("site_007", "007"), ("KY", "KY"), ("St_Mary_s", "St Mary's")]
    frame = plan_frame(corpus, plans, cfg)  # `multimed-fl sites` and sites.parquet: both names
    assert frame[["site", "origin_site"]].values.tolist() == [
        ["site_007", "007"],
        ["KY", "KY"],
        ["St_Mary_s", "St Mary's"],
    ]
    for name in ("St_Mary_s", "St Mary's"):  # the site's name or its origin's
        held = plan_sites(corpus, load_config([*NATURAL, f"sites.holdout_sites=[{name}]"]))
        assert [p.site for p in held if p.role == "held_out"] == ["St_Mary_s"]


def test_two_origins_with_one_site_name_are_refused_naming_both(manifest_corpus):
    with pytest.raises(PlanError, match=r"origin sites 'St Mary' and 'St_Mary' both become site St_Mary: .*unique"):
        plan_sites(manifest_corpus({"St Mary": 100, "St_Mary": 100}), load_config(["sites.planner=natural"]))
    with pytest.raises(
        PlanError, match=r"origin sites 'KY' and 'ky' become sites KY and ky, which differ only in case"
    ):
        plan_sites(manifest_corpus({"KY": 100, "ky": 100}), load_config(["sites.planner=natural"]))
    with pytest.raises(PlanError, match=r"origin site '\?!' has no letter or digit"):
        plan_sites(manifest_corpus({"?!": 100, "KY": 100}), load_config(["sites.planner=natural"]))


def test_a_long_group_name_is_cut_to_its_first_member_and_a_count():
    members = [f"clinic_{i:02d}" for i in range(12)]
    assert group_site_name(members[:3]) == "clinic_00+clinic_01+clinic_02"
    assert group_site_name(members) == "clinic_00+11_more"
    assert len(site_name("x" * 200)) == MAX_SITE_NAME


def test_an_origin_named_with_a_plus_is_not_taken_for_a_group(manifest_corpus):
    """'+' joins a group's origins in its origin_site, and an origin may hold one in its own name:
    'A' is no origin of the single site 'A+B', and 'A+B' is one of the group 'A+B' + 'C'."""
    alone = manifest_corpus({"A+B": 300, "KY": 300})
    held = plan_sites(alone, load_config([*NATURAL, "sites.holdout_sites=[A+B]"]))
    assert [(p.site, p.origin_site, p.role) for p in held] == [("A_B", "A+B", "held_out"), ("KY", "KY", "train")]
    with pytest.raises(PlanError, match=r"names unknown sites \['A'\]; planned sites: A_B \(A\+B\), KY"):
        plan_sites(alone, load_config([*NATURAL, "sites.holdout_sites=[A]"]))
    grouped = manifest_corpus({"A+B": 20, "C": 40, "KY": 300})
    base = [*NATURAL, "sites.min_site_size=50"]
    assert [(p.site, p.origin_site) for p in plan_sites(grouped, load_config([*base, "sites.holdout_sites=[KY]"]))] == [
        ("KY", "KY"),
        ("A_B+C", "A+B+C"),
    ]
    with pytest.raises(PlanError, match=r"origin site A\+B, which sites.min_site_size=50 grouped into site A_B\+C"):
        plan_sites(grouped, load_config([*base, "sites.holdout_sites=[A+B]"]))
    with pytest.raises(PlanError, match=r"origin site C, which sites.min_site_size=50 grouped into site A_B\+C"):
        plan_sites(grouped, load_config([*base, "sites.holdout_sites=[C]"]))
    with pytest.raises(PlanError, match=r"names unknown sites \['B'\]"):
        plan_sites(grouped, load_config([*base, "sites.holdout_sites=[B]"]))
