"""What the server checks in a secure round, where it sees only the sites' declarations and the sum.

Each site declares in the clear the weights its masked vector carries (group -> a_g). Before
unmasking, the server refuses a round in which a declaration cannot be read or exceeds what the
site's handshake allows, and one whose sum for a group would be one site's own update (fewer than
secure_aggregation.min_sites_per_group sent it). After unmasking, it refuses a sum that is not one
of honest vectors with those weights (strategies/secure_sums.py, sum_problems): it cannot say which
site broke it, so the whole round is refused.
"""

from __future__ import annotations

import json
from typing import Any

from flwr.app import RecordDict

from federated.core.protocol import (
    SECURE_CLIP_NORM,
    SECURE_GROUPS_RECORD,
    SECURE_LAYOUT,
    SECURE_MAX_WEIGHT,
    SECURE_UNIFORM,
    SECURE_WEIGHTS,
    SECURE_WITHHELD,
)
from federated.server.round import Federation
from federated.server.secure_round import SecureSum
from strategies.secure_sums import GROUPED, Layout, declaration_problem, lone_contributions, sum_problems

Declarations = dict[int, dict[str, float]]  # node -> the weights it declared in the clear (group -> a_g)


def declared_weights(content: RecordDict) -> dict[str, float] | str:
    """The weights a site declared in the clear (group -> a_g), or why they cannot be read. The
    groups it sent a weight for are this object's keys (nothing else says which)."""
    record = content.config_records.get(SECURE_GROUPS_RECORD)
    raw = record.get(SECURE_WEIGHTS) if record is not None else None
    try:
        weights = json.loads(str(raw)) if raw is not None else None
    except ValueError:
        weights = None
    if not isinstance(weights, dict) or not all(
        isinstance(a, (int, float)) and not isinstance(a, bool) for a in weights.values()
    ):
        return (
            f"sent no readable declaration of its weights ({SECURE_GROUPS_RECORD!r} record, "
            f"{SECURE_WEIGHTS!r}: a JSON object group -> weight)"
        )
    return {str(g): float(a) for g, a in weights.items()}


def bad_declarations(
    fed: Federation, parsed: dict[int, dict[str, float] | str], keys: dict[str, Any], layout: Layout
) -> str | None:
    """Why the round must not be unmasked because of what a site declared in the clear (this can
    name the site): a declaration that cannot be read (declared_weights), or weights each bounded
    by what its handshake declared (secure_sums.py, declaration_problem)."""
    layout_groups = frozenset(s.group for s in layout.segments)
    withheld = frozenset(json.loads(str(keys[SECURE_WITHHELD])))
    max_weight, uniform = float(keys[SECURE_MAX_WEIGHT]), bool(keys[SECURE_UNIFORM])
    factor = fed.cfg.strategy.max_examples_factor
    problems = []
    for node, declared in sorted(parsed.items()):
        if isinstance(declared, str):
            problems.append(f"{fed.site(node)} {declared}")
            continue
        examples = fed.strategy.declared_examples.get(node)
        cap = 1.0 if uniform or examples is None else min(1.0, examples * factor / max_weight)
        allowed = fed.strategy.allowed_groups.get(node) if keys[SECURE_LAYOUT] == GROUPED else None
        why = declaration_problem(declared, layout_groups, cap, allowed, withheld)
        if why:
            problems.append(f"{fed.site(node)} {why}")
    if not problems:
        return None
    return "; ".join(problems) + ": the round is refused before unmasking (its sum would not be checkable)"


def lone_groups(fed: Federation, declared: Declarations) -> str | None:
    """Why the sum must not be unmasked: a group fewer than min_sites_per_group sites sent a weight
    for (the sites say which, in the clear), whose sum would be those sites' own update."""
    contributed = {fed.site(node): sorted(weights) for node, weights in declared.items()}
    lone = lone_contributions(contributed, fed.cfg.secure_aggregation.min_sites_per_group)
    if not lone:
        return None
    detail = "; ".join(f"group {g} was sent by {', '.join(sites)} only" for g, sites in sorted(lone.items()))
    return (
        f"{detail}: its sum would be that site's own update "
        f"(secure_aggregation.min_sites_per_group={fed.cfg.secure_aggregation.min_sites_per_group})"
    )


def refused_sum(
    fed: Federation, keys: dict[str, Any], result: SecureSum, layout: Layout, declared: Declarations
) -> str | None:
    """Why the unmasked sum is not one of honest vectors with the weights the sites declared
    (`declared`, read and checked before unmasking; secure_sums.py, sum_problems), or None. The sum
    cannot say which site's vector broke it."""
    assert result.summed is not None and result.quantised is not None
    totals: dict[str, float] = {}
    for node in result.survivors:  # every site in the sum
        for group, a in declared[node].items():
            totals[group] = totals.get(group, 0.0) + a
    sa, cfg = fed.cfg.secure_aggregation, fed.cfg
    bounds = [b for b in (cfg.strategy.max_update_norm, keys.get(SECURE_CLIP_NORM)) if b]
    problems = sum_problems(
        layout,
        result.summed,
        result.quantised,
        totals,
        len(result.survivors),
        sa.clipping_range,
        result.levels,
        norm_bound=float(min(bounds)) if bounds else None,
        withheld=frozenset(json.loads(str(keys[SECURE_WITHHELD]))),
    )
    if not problems:
        return None
    return (
        "aggregate refused, the model keeps its value this round: the unmasked sum is not what the sites' "
        f"declared weights allow ({'; '.join(problems)}). At least one site sent a vector other than the one "
        "it declared; which one cannot be told: SecAgg+ shows the server only the sum"
    )
