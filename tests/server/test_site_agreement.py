"""One schema and one version for a federation: who agrees, who is left out and why."""

from __future__ import annotations

import dataclasses

import pytest

from federated.core.multimed import CATALOGUE
from federated.core.protocol import Role
from federated.server.evaluation import SiteProfile
from federated.server.site_agreement import FederationError, agree, exact_schema

CELL = CATALOGUE.restrict(["cell_type"])
OTHER_CLASSES = dataclasses.replace(
    CELL, tasks={"cell_type": dataclasses.replace(CELL.task("cell_type"), classes=tuple(f"c{i}" for i in range(10)))}
)


def profile(site: str, schema=CELL, tasks=("cell_type",), version="0.1.0") -> SiteProfile:
    return SiteProfile(
        site, Role.TRAIN, "site_local", ["scrna"], list(tasks), 10, 5, site, schema=schema, version=version
    )


def test_the_definition_most_sites_hold_wins_and_the_other_site_is_named() -> None:
    result = agree([profile("a"), profile("b", OTHER_CLASSES), profile("c")], "0.1.0", per_site_tasks=True)
    assert result.schema == CELL
    assert set(result.incompatible) == {"b"}
    assert "task 'cell_type'" in result.incompatible["b"] and "c0" in result.incompatible["b"]


def test_a_tie_goes_to_the_first_site_by_name() -> None:
    result = agree([profile("b", OTHER_CLASSES), profile("a")], "0.1.0", per_site_tasks=True)
    assert result.schema == OTHER_CLASSES and set(result.incompatible) == {"a"}


def test_another_version_is_incompatible() -> None:
    result = agree([profile("a"), profile("b", version="0.0.9")], "0.1.0", per_site_tasks=True)
    assert result.incompatible == {"b": "runs multimed-fl 0.0.9, the server 0.1.0"}


def test_a_site_contributes_only_the_tasks_it_holds() -> None:
    both = CATALOGUE.restrict(["cell_type", "bone_age"])
    odd = dataclasses.replace(
        both, tasks={**both.tasks, "bone_age": dataclasses.replace(both.task("bone_age"), unit="days")}
    )
    result = agree([profile("a", both, ("cell_type", "bone_age")), profile("b", odd)], "0.1.0", per_site_tasks=True)
    assert result.incompatible == {}  # b's bone_age is not one of its tasks here
    assert set(result.schema.tasks) == {"cell_type", "bone_age"} and result.schema.task("bone_age").unit == "months"


def test_simulation_needs_every_schema_equal() -> None:
    assert exact_schema([profile("a"), profile("b")]) == CELL
    with pytest.raises(FederationError, match="sites a and b hold corpora with different schemas"):
        exact_schema([profile("a"), profile("b", OTHER_CLASSES)])
