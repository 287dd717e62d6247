"""One SecAgg+ round (federated/server/secure_round.py) with Flower's own secaggplus_mod at the sites.

The sites are a toy ClientApp behind the real mods (clients/secure_aggregation.py), each replying
with a given update, so every number below is known: the secure aggregate is compared with the
plain one, and what the server receives is checked for anything unmasked.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from clients.secure_aggregation import FITRES_PARAMETERS, masked_update_mod, secure_aggregation_gate
from federated.core import protocol as P
from federated.core.arrays import pack_arrays
from federated.core.config.schema import SecureAggregationConfig
from federated.core.models import group_of
from federated.engines.inprocess import InProcessGrid
from federated.server.secure_round import ProtocolSizes, secure_sum
from federated.server.transport import exchange
from strategies.aggregation import groupwise_weighted_mean, weighted_mean
from strategies.secure_sums import (
    GROUPED,
    SINGLE,
    Layout,
    apply_sums,
    quantisation_bound,
    site_vector,
    site_weights,
    sum_problems,
    zero_level,
)

N_SITES = 5
W = 1000.0  # the weight cap the server sends
SA = SecureAggregationConfig(name="secaggplus")
RNG = np.random.default_rng(7)
GLOBAL = {
    "encoders.ct.w": RNG.normal(0, 1, (40, 25)).astype(np.float32),
    "encoders.mri.w": RNG.normal(0, 1, (30, 20)).astype(np.float32),
    "fusion.w": RNG.normal(0, 1, (20,)).astype(np.float32),
    "heads.bone_age.w": RNG.normal(0, 1, (20, 3)).astype(np.float32),
}
# Both models end in float32: each entry is also rounded to float32 (half an ulp each side)
FLOAT32_ROUNDING = float(np.finfo(np.float32).eps) * max(float(np.abs(v).max()) for v in GLOBAL.values())
# Sites hold different groups: ct only, mri only, both, ...; every site trains the fusion block.
HOLDS = [("encoder/ct",), ("encoder/mri",), ("encoder/ct", "encoder/mri"), ("encoder/ct",), ("encoder/mri",)]
EXAMPLES = [120, 40, 300, 75, 210]


def _site_update(i: int) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Site i's trained arrays (its groups moved, the others returned as they came) and its examples per group."""
    groups = {*HOLDS[i], "fusion", "head/bone_age"}
    rng = np.random.default_rng(100 + i)
    trained = {
        k: (v + rng.normal(0, 0.05, v.shape) if group_of(k) in groups else v).astype(np.float32)
        for k, v in GLOBAL.items()
    }
    return trained, {g: float(EXAMPLES[i]) for g in sorted(groups)}


class Sites:
    """A toy federation: node i replies to a training message with _site_update(i); some nodes
    fail in a chosen SecAgg+ stage."""

    def __init__(
        self, fail: dict[str, set[int]] | None = None, boost: dict[int, float] | None = None, tamper=None
    ) -> None:
        self.fail = fail or {}
        self.boost = boost or {}  # site -> a factor on its update (its difference from the global model)
        self.tamper = tamper  # (site, vector, layout) -> None: changes a site's vector before it is masked
        app = ClientApp(mods=[self.faults, secure_aggregation_gate, self.dishonest, masked_update_mod])
        app.train()(self.train)
        self.grid = InProcessGrid(app, [{} for _ in range(N_SITES)], {})
        self.nodes = list(self.grid.get_node_ids())
        self.received: list[Message] = []  # every reply the server got, in every stage

    def index(self, node: int) -> int:
        return self.nodes.index(node)

    def faults(self, msg: Message, context: Context, call_next):
        configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
        stage = configs.get(Key.STAGE) if configs is not None else None
        if self.index(msg.metadata.dst_node_id) in self.fail.get(str(stage), set()):
            raise RuntimeError(f"site {self.index(msg.metadata.dst_node_id)} died in the {stage} stage")
        return call_next(msg, context)

    def dishonest(self, msg: Message, context: Context, call_next):
        reply = call_next(msg, context)
        if self.tamper is None or FITRES_PARAMETERS not in reply.content.array_records:
            return reply
        (vector,) = reply.content.array_records[FITRES_PARAMETERS].to_numpy_ndarrays()
        vector = np.array(vector, np.float64)
        kind = str(msg.content.config_records[P.CONFIG_RECORD][P.SECURE_LAYOUT])
        self.tamper(self.index(context.node_id), vector, Layout.of(GLOBAL, kind))
        reply.content[FITRES_PARAMETERS] = ArrayRecord([vector])
        return reply

    def train(self, msg: Message, context: Context) -> Message:
        i = self.index(context.node_id)
        trained, groups = _site_update(i)
        trained = {k: GLOBAL[k] + self.boost.get(i, 1.0) * (v - GLOBAL[k]) for k, v in trained.items()}
        n = max(groups.values())
        return Message(
            RecordDict(
                {
                    P.ARRAYS_RECORD: pack_arrays(trained),
                    P.METRICS_RECORD: MetricRecord({P.NUM_EXAMPLES: n, P.TRAIN_LOSS: 0.5, P.STEPS: 3}),
                    P.TRAINED_RECORD: ConfigRecord({P.GROUPS: list(groups), P.GROUP_EXAMPLES: list(groups.values())}),
                }
            ),
            reply_to=msg,
        )

    def send(self, messages: list[Message]) -> list[Message]:
        replies = exchange(self.grid, messages)
        self.received += replies
        return replies

    def round(
        self,
        layout: str,
        sa: SecureAggregationConfig = SA,
        max_norm: float = 0.0,
        withheld: tuple[str, ...] = (),
        max_weight: float = W,
        before_unmask=None,
    ):
        config = {
            P.SECURE_MAX_NORM: max_norm,
            P.SERVER_ROUND: 1,
            P.SECURE_LAYOUT: layout,
            P.SECURE_MAX_WEIGHT: max_weight,
            P.SECURE_UNIFORM: 0,
            P.SECURE_CLIP: sa.clipping_range,
            P.SECURE_WITHHELD: json.dumps(list(withheld)),
        }
        content = RecordDict({P.ARRAYS_RECORD: pack_arrays(GLOBAL), P.CONFIG_RECORD: ConfigRecord(config)})
        messages = [Message(content, dst_node_id=n, message_type=MessageType.TRAIN) for n in self.nodes]
        return secure_sum(self.send, messages, sa, seed=1, before_unmask=before_unmask)


def _plain(layout: str, sites: list[int]) -> dict[str, np.ndarray]:
    updates = [_site_update(i) for i in sites]
    if layout == SINGLE:
        return weighted_mean([u for u, _ in updates], [max(g.values()) for _, g in updates])
    return groupwise_weighted_mean(GLOBAL, [u for u, _ in updates], [g for _, g in updates], group_of)


def _secure_model(layout: str, summed: np.ndarray, max_weight: float = W) -> dict[str, np.ndarray]:
    return apply_sums(Layout.of(GLOBAL, layout), GLOBAL, summed, 0.5 / max_weight)[0]


def _bound(layout: str, sites: list[int], levels: int, max_weight: float = W) -> float:
    """The quantisation bound on the aggregate: the bound on the sum of the sites' entries, over the
    least total weight of a group (every entry of the mean is sum(a*delta)/sum(a)), doubled: the
    total weight carries the same rounding error (first order)."""
    kind = Layout.of(GLOBAL, layout)
    weights = [site_weights(_site_update(i)[1], max(_site_update(i)[1].values()), layout, False) for i in sites]
    least = min(sum(min(1.0, w.get(s.group, 0) / max_weight) for w in weights) for s in kind.segments)
    return 2 * quantisation_bound(len(sites), SA.clipping_range, levels) / least + FLOAT32_ROUNDING


@pytest.mark.parametrize("layout", [GROUPED, SINGLE])
def test_the_secure_aggregate_equals_the_plain_one_within_the_quantisation_bound(layout):
    sites = Sites()
    result = sites.round(layout)
    assert result.reason == "" and result.failures == {}
    assert result.survivors == sites.nodes
    secure, plain = _secure_model(layout, result.summed), _plain(layout, list(range(N_SITES)))
    error = max(float(np.max(np.abs(secure[k].astype(np.float64) - plain[k]))) for k in GLOBAL)
    assert error <= _bound(layout, list(range(N_SITES)), result.levels)
    moved = max(float(np.max(np.abs(plain[k] - GLOBAL[k]))) for k in GLOBAL)
    assert moved > 100 * error  # the rounds did move the model, far beyond the error


def test_the_server_receives_no_unmasked_update():
    sites = Sites()
    sites.round(GROUPED)
    layout = Layout.of(GLOBAL, GROUPED)
    collected = [m for m in sites.received if RECORD_KEY_CONFIGS in m.content.config_records]
    assert len(sites.received) == 4 * N_SITES  # four stages, every site answered each
    for msg in sites.received:  # no reply carries an array: nothing of the model travels in the clear
        assert all(len(record) == 0 for record in msg.content.array_records.values())
        assert P.TRAINED_RECORD not in msg.content.config_records
    masked = [m for m in collected if Key.MASKED_PARAMETERS in m.content.config_records[RECORD_KEY_CONFIGS]]
    assert len(masked) == N_SITES
    from flwr.common import bytes_to_ndarray

    for msg in masked:
        i = sites.index(msg.metadata.src_node_id)
        trained, groups = _site_update(i)
        plain = site_vector(layout, GLOBAL, trained, site_weights(groups, 0, GROUPED, False), W, 1.0).vector
        _factor, vector = (
            bytes_to_ndarray(b) for b in msg.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]
        )
        assert vector.shape == plain.shape
        # alone, the masked vector says nothing of the update: uniform over [0, 2**32), uncorrelated
        r = np.corrcoef(vector.astype(np.float64), plain)[0, 1]
        assert abs(r) < 0.1, r
        assert vector.min() >= 0 and vector.max() < SA.modulus_range
        assert np.mean(vector) == pytest.approx(SA.modulus_range / 2, rel=0.05)
        # the scalar metrics do travel in the clear (documented): the site's loss and example count
        assert P.METRICS_RECORD in msg.content.metric_records


def test_a_site_that_drops_after_sharing_keys_is_recovered_and_left_out_of_the_aggregate():
    sites = Sites(fail={Stage.COLLECT_MASKED_VECTORS: {3}})
    result = sites.round(GROUPED)
    rest = [0, 1, 2, 4]
    assert result.reason == ""
    assert result.survivors == [sites.nodes[i] for i in rest]
    assert "collect_masked_vectors stage" in result.failures[sites.nodes[3]]
    assert "site 3 died" in result.failures[sites.nodes[3]]
    secure, plain = _secure_model(GROUPED, result.summed), _plain(GROUPED, rest)
    error = max(float(np.max(np.abs(secure[k].astype(np.float64) - plain[k]))) for k in GLOBAL)
    assert error <= _bound(GROUPED, rest, result.levels)


def test_a_site_that_drops_before_sharing_keys_is_simply_not_in_the_sum():
    """Flower's own workflow declares such a site dead and fails the round; here it never masked."""
    sites = Sites(fail={Stage.SETUP: {1}, Stage.SHARE_KEYS: {2}})
    result = sites.round(GROUPED)
    assert result.reason == ""
    assert result.survivors == [sites.nodes[i] for i in (0, 3, 4)]
    secure, plain = _secure_model(GROUPED, result.summed), _plain(GROUPED, [0, 3, 4])
    assert max(float(np.max(np.abs(secure[k] - plain[k]))) for k in GLOBAL) <= _bound(GROUPED, [0, 3, 4], result.levels)


def test_sites_lost_in_the_unmask_stage_are_still_in_the_sum_while_enough_shares_remain():
    sites = Sites(fail={Stage.UNMASK: {0, 4}})
    result = sites.round(SINGLE)
    assert result.reason == ""
    assert result.survivors == sites.nodes  # their vectors are in; their masks came off by the others' shares
    assert "unmask stage" in result.late[sites.nodes[0]] and "unmask stage" in result.late[sites.nodes[4]]
    assert result.failures == {}  # not failures: their updates are in the aggregate
    secure, plain = _secure_model(SINGLE, result.summed), _plain(SINGLE, list(range(N_SITES)))
    assert max(float(np.max(np.abs(secure[k] - plain[k]))) for k in GLOBAL) <= _bound(
        SINGLE, list(range(N_SITES)), result.levels
    )


def test_the_site_checks_the_norm_bound_itself_and_leaves_the_round_when_it_fails_it():
    """strategy.max_update_norm, which the server cannot check on a masked update."""
    sites = Sites(boost={2: 100.0})
    result = sites.round(GROUPED, max_norm=50.0)
    assert result.reason == ""
    assert "exceeds strategy.max_update_norm=50; not sent" in result.failures[sites.nodes[2]]
    rest = [0, 1, 3, 4]
    secure, plain = _secure_model(GROUPED, result.summed), _plain(GROUPED, rest)
    assert max(float(np.max(np.abs(secure[k] - plain[k]))) for k in GLOBAL) <= _bound(GROUPED, rest, result.levels)


def test_below_the_threshold_the_round_fails_with_the_stage_and_the_counts():
    sites = Sites(fail={Stage.COLLECT_MASKED_VECTORS: {0, 2, 3}})
    result = sites.round(GROUPED)
    assert result.summed is None
    assert result.reason.startswith("collect stage: 2 of 5 sites sent a masked vector, fewer than the threshold 3")


def test_too_few_shares_in_the_unmask_stage_fail_the_round_with_the_reason():
    sites = Sites(fail={Stage.UNMASK: {0, 1, 2}})
    result = sites.round(GROUPED)
    assert result.summed is None
    assert result.reason.startswith("unmask stage: 2 of 5 sites answered")
    assert "fewer than the threshold 3" in result.reason


def test_too_many_sites_for_the_field_are_refused_before_any_message():
    sites = Sites()
    result = sites.round(GROUPED, SecureAggregationConfig(name="secaggplus", quantization_range=2**30))
    assert result.summed is None and "would wrap around" in result.reason
    assert sites.received == []


@pytest.mark.parametrize(
    ("n", "num_shares", "threshold", "expected"),
    [
        (5, 1.0, 0.6, (5, 3)),
        (10, 1.0, 0.6, (10, 6)),
        (10, 0.5, 0.6, (5, 3)),  # 5 is odd already
        (8, 0.5, 0.6, (5, 3)),  # 4 made odd
        (3, 0.5, 0.6, (3, 2)),  # 2 or fewer: every site; threshold at least 2
        (50, 7, 4, (7, 4)),
    ],
)
def test_protocol_sizes_follow_flowers_rules(n, num_shares, threshold, expected):
    sizes = ProtocolSizes.for_round(
        n, SecureAggregationConfig("secaggplus", num_shares=num_shares, reconstruction_threshold=threshold)
    )
    assert (sizes.num_shares, sizes.threshold) == expected


def test_a_site_whose_run_asks_for_secure_aggregation_refuses_a_plain_training_message(smoke_corpus):
    from clients.secure_aggregation import UnmaskedUpdateRefused
    from federated.core.config import config_to_yaml, load_config

    cfg = load_config(["scale=smoke", "secure_aggregation=secaggplus", f"corpus.path={smoke_corpus}"])
    context = Context(
        run_id=1,
        node_id=2,
        node_config={"partition-id": 0, "num-partitions": 10},
        state=RecordDict(),
        run_config={P.CONFIG_KEY: config_to_yaml(cfg)},
    )
    msg = Message(
        RecordDict({P.CONFIG_RECORD: ConfigRecord({P.SERVER_ROUND: 1})}), dst_node_id=2, message_type=MessageType.TRAIN
    )
    with pytest.raises(UnmaskedUpdateRefused, match="sends its update only masked"):
        masked_update_mod(msg, context, lambda m, c: pytest.fail("the site trained for a plain message"))


def test_a_withheld_group_keeps_its_value_and_the_others_are_averaged():
    sites = Sites()
    result = sites.round(GROUPED, withheld=("encoder/mri",))
    secure, plain = _secure_model(GROUPED, result.summed), _plain(GROUPED, list(range(N_SITES)))
    np.testing.assert_array_equal(secure["encoders.mri.w"], GLOBAL["encoders.mri.w"])
    bound = _bound(GROUPED, list(range(N_SITES)), result.levels)
    assert max(float(np.max(np.abs(secure[k] - plain[k]))) for k in GLOBAL if k != "encoders.mri.w") <= bound
    sent = [json.loads(m.content.config_records[P.SECURE_GROUPS_RECORD][P.SECURE_WEIGHTS]) for m in result.replies]
    assert all("encoder/mri" not in groups for groups in sent)  # what each site says it sent, in the clear


def test_a_veto_before_unmasking_means_no_share_is_asked_for():
    sites = Sites()
    seen = {}

    def veto(collected):
        seen.update(collected)
        return "group encoder/mri was sent by site 2 only"

    result = sites.round(GROUPED, before_unmask=veto)
    assert result.summed is None and result.reason == "not unmasked: group encoder/mri was sent by site 2 only"
    assert sorted(seen) == sorted(sites.nodes)
    stages = [m.content.config_records[RECORD_KEY_CONFIGS] for m in sites.received]
    assert not any(Key.SHARE_LIST in c for c in stages)  # no unmask stage: the sum was never read
    assert len(sites.received) == 3 * N_SITES


def test_secagg_plus_with_ring_neighbourhoods_recovers_dropouts_in_every_stage():
    """num_shares < 1: each site shares its secrets with a ring of neighbours only (SecAgg+ proper)."""
    global N_SITES, HOLDS, EXAMPLES
    saved = N_SITES, HOLDS, EXAMPLES
    N_SITES, HOLDS, EXAMPLES = 9, [*HOLDS, *HOLDS[:4]], [*EXAMPLES, 90, 33, 150, 60]
    try:
        sa = SecureAggregationConfig(name="secaggplus", num_shares=0.6, reconstruction_threshold=0.6)
        assert ProtocolSizes.for_round(9, sa) == ProtocolSizes(5, 3)
        fail = {Stage.SHARE_KEYS: {0}, Stage.COLLECT_MASKED_VECTORS: {5}, Stage.UNMASK: {7}}
        sites = Sites(fail=fail)
        result = sites.round(GROUPED, sa)
        rest = [1, 2, 3, 4, 6, 7, 8]
        assert result.reason == "" and result.survivors == [sites.nodes[i] for i in rest]
        assert set(result.late) == {sites.nodes[7]}  # lost in the unmask stage, its update still in
        secure, plain = _secure_model(GROUPED, result.summed), _plain(GROUPED, rest)
        assert max(float(np.max(np.abs(secure[k] - plain[k]))) for k in GLOBAL) <= _bound(GROUPED, rest, result.levels)
    finally:
        N_SITES, HOLDS, EXAMPLES = saved


@pytest.mark.parametrize("levels", [2**22, 0])
def test_the_bound_holds_when_a_group_weighs_little_against_the_cap(levels):
    """W far above the sites' examples: every weight a = n/W is small and the mean divides the sum's
    rounding error by sum(a). Flower's 2**22 levels then leave errors of ~1e-4; the finest levels the
    field allows (0, the default) keep them ~1e-7."""
    sites = Sites()
    sa = SecureAggregationConfig(name="secaggplus", quantization_range=levels)
    result = sites.round(GROUPED, sa, max_weight=50_000.0)
    assert result.levels == (levels or 2**29)  # 5 sites: 5 x 2**29 < 2**32
    secure, plain = _secure_model(GROUPED, result.summed, 50_000.0), _plain(GROUPED, list(range(N_SITES)))
    error = max(float(np.max(np.abs(secure[k].astype(np.float64) - plain[k]))) for k in GLOBAL)
    assert error <= _bound(GROUPED, list(range(N_SITES)), result.levels, 50_000.0)
    if levels == 0:
        assert error < 1e-5


def _declared_totals(result) -> dict[str, float]:
    totals: dict[str, float] = {}
    for msg in result.replies:  # what each site declared in the clear
        for group, a in json.loads(msg.content.config_records[P.SECURE_GROUPS_RECORD][P.SECURE_WEIGHTS]).items():
            totals[group] = totals.get(group, 0.0) + a
    return totals


def _check(result, withheld=frozenset()):
    layout = Layout.of(GLOBAL, GROUPED)
    n = len(result.survivors)
    return sum_problems(
        layout,
        result.summed,
        result.quantised,
        _declared_totals(result),
        n,
        SA.clipping_range,
        result.levels,
        None,
        withheld,
    )


def test_an_honest_sum_passes_the_checks_and_a_withheld_groups_zeros_are_exact():
    sites = Sites()
    result = sites.round(GROUPED, withheld=("encoder/mri",))
    assert _check(result, frozenset({"encoder/mri"})) == []
    mri = next(s for s in Layout.of(GLOBAL, GROUPED).segments if s.group == "encoder/mri")
    zeros = result.quantised[mri.start : mri.weight_index + 1]
    assert (zeros == N_SITES * zero_level(SA.clipping_range, result.levels)).all()  # exact, not within a bound
    np.testing.assert_array_equal(result.summed[mri.start : mri.weight_index + 1], 0.0)


def test_a_vector_changed_before_masking_fails_the_checks_whatever_the_site_declared():
    """Site 3 declared its weights honestly (masked_update_mod wrote them), then changed its vector:
    one step into a withheld group, and its weight for fusion negated."""

    def tamper(site, vector, layout):
        if site == 3:
            mri = next(s for s in layout.segments if s.group == "encoder/mri")
            fusion = next(s for s in layout.segments if s.group == "fusion")
            vector[mri.start] = 2 * SA.clipping_range / 2**20  # a few quantisation steps
            vector[fusion.weight_index] *= -1

    result = Sites(tamper=tamper).round(GROUPED, withheld=("encoder/mri",))
    problems = _check(result, frozenset({"encoder/mri"}))
    assert len(problems) == 2
    assert problems[0].startswith("group encoder/mri (withheld this round): no site declared a weight for it, yet 1 ")
    assert problems[1].startswith("group fusion: total weight")


class SilentSites(Sites):
    """Sites whose replies to a stage do not come: `silent` stage -> sites with no reply at all,
    `lost` stage -> sites whose reply comes as the error a lost reply is (its content never arrived,
    as transport.exchange reports a site killed while sending it)."""

    def __init__(self, silent: dict[str, set[int]], lost: dict[str, set[int]], **kw) -> None:
        super().__init__(**kw)
        self.silent, self.lost = silent, lost

    def send(self, messages: list[Message]) -> list[Message]:
        from flwr.app import Error
        from flwr.common.constant import ErrorCode

        stage = str(messages[0].content.config_records[RECORD_KEY_CONFIGS][Key.STAGE])
        out = []
        for reply in super().send(messages):
            i = self.index(reply.metadata.src_node_id)
            if i in self.silent.get(stage, set()):
                continue
            if i in self.lost.get(stage, set()):
                sent = next(m for m in messages if m.metadata.dst_node_id == reply.metadata.src_node_id)
                lost = Error(ErrorCode.MESSAGE_UNAVAILABLE, "its reply's content did not arrive")
                reply = Message(lost, reply_to=sent)
            out.append(reply)
        return out


def test_sites_that_gave_a_stage_no_reply_are_recorded_for_the_round_s_evaluation():
    """A site with no reply to a stage, or one whose reply's content was lost, is dead or busy: the
    round's evaluation then awaits it briefly (SecureSum.unanswered). A site whose app raised
    answered: it is alive."""
    sites = SilentSites(silent={Stage.COLLECT_MASKED_VECTORS: {3}}, lost={Stage.UNMASK: {4}})
    result = sites.round(GROUPED)
    assert result.reason == ""
    assert result.unanswered == {sites.nodes[3], sites.nodes[4]}
    assert result.failures[sites.nodes[3]] == "collect_masked_vectors stage: no reply"
    assert "unmask stage" in result.late[sites.nodes[4]]  # its update is in the sum all the same
    raised = Sites(fail={Stage.COLLECT_MASKED_VECTORS: {3}}).round(GROUPED)
    assert "site 3 died" in next(iter(raised.failures.values())) and raised.unanswered == set()
