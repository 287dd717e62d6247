"""The message protocol between the ServerApp and every site's ClientApp, in one place.

Both sides import these names; neither spells a key as a string literal. A record name is a key
of a message's RecordDict; a config key is a key inside a ConfigRecord or MetricRecord; a run
config key is a key of Flower's run config (or a SuperNode's node config). Over a SuperLink every
message and reply below travels folded into one record (core/folding.py) and is unfolded before
either side reads it, so the protocol is the same under every engine.

query (handshake)  server: CONFIG_RECORD {RESTORE_ROUND?}      site: PROFILE_RECORD
train              server: ARRAYS_RECORD, CONFIG_RECORD {SERVER_ROUND, algorithm keys},
                           algorithm records (e.g. SCAFFOLD's CONTROL_RECORD)
                   site:   ARRAYS_RECORD, METRICS_RECORD {NUM_EXAMPLES, TRAIN_LOSS, STEPS},
                           TRAINED_RECORD {GROUPS, GROUP_EXAMPLES}, PRIVACY_RECORD (DP-SGD),
                           algorithm records (e.g. CONTROL_DELTA_RECORD)
                   A strategy's algorithm keys and records are declared in its own module
                   (strategies/<name>.py: both its sides import them there), never here.
train, evaluating  (engine.evaluate_with_train, deployment) the train message's CONFIG_RECORD also
                           holds EVALUATE_ROUND: the site first evaluates the model it received, as
                           that round's evaluation, and its reply also holds the evaluate reply's
                           records below, each named EVALUATED + its name
train, secure      four messages per round (SecAgg+ stages: setup, share keys, collect, unmask),
(secure_aggregation=secaggplus)  each with Flower's "secaggplus_configs" record; the collect
                           stage is the train message above plus SECURE_* config keys, and the
                           site's reply holds its masked vector, METRICS_RECORD,
                           SECURE_GROUPS_RECORD and PRIVACY_RECORD only
                           (clients/secure_aggregation.py)
evaluate           server: ARRAYS_RECORD, CONFIG_RECORD {SERVER_ROUND}
                   site:   METRICS_RECORD {NUM_EXAMPLES, "<task>/<metric>"...},
                           PERSONAL_RECORD (the site's personalised model, same keys),
                           ADAPTED_RECORD (a held-out site's test-time-adapted model, last
                           round, same keys)
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any


class Role(StrEnum):
    """What a site does in a run. A StrEnum: it is written as its value in every output."""

    TRAIN = "train"  # trains and is scored in-distribution (ID) on its test split
    HELD_OUT = "held_out"  # never trains; scored out-of-distribution (OOD) on all its data
    ID_EVAL = "id_eval"  # a training site that does not train this run: scored ID on its test split

    @property
    def scored_id(self) -> bool:
        return self in (Role.TRAIN, Role.ID_EVAL)

    @property
    def label(self) -> str:
        """How tables show the role."""
        return {Role.TRAIN: "ID", Role.ID_EVAL: "ID (eval)", Role.HELD_OUT: "OOD"}[self]


# Run config (Flower run config, or a SuperNode's node config).
CONFIG_KEY = "multimed-config"  # the whole resolved experiment config as one YAML string
CORPUS_KEY = "corpus-path"
DEVICE_KEY = "device"  # node config: where this site computes; wins over the run's engine.device
# Node config, deployment: the privacy floor a hospital sets for the feature statistics round
# (clients/site_runtime.py ReleaseFloor); the run config is the server's, so it cannot set these.
STATS_MIN_COUNT_KEY = "stats-min-count"  # the least min_count a query may ask (default 10)
STATS_EPSILON_KEY = "stats-epsilon"  # > 0: the most epsilon a run's queries spend in all, and noise required;
# 0 (default): exact aggregates allowed
RESUME_KEY = "resume"  # run config: true = continue the run in out-dir from its checkpoint
STATE_DIR_KEY = "state-dir"  # where a site saves its state for resumed runs
SITE_STATE_DIR = "site_state"  # its folder inside a run's output folder
STATISTICS_ONLY_KEY = "statistics-only"  # run config: true = the ServerApp profiles the sites, trains nothing
OUT_DIR_KEY = "out-dir"  # run config: the ServerApp's output folder (empty: runs/flwr-<run id>)
SITE_KEY = "site"  # node config, deployment: the site a hospital's SuperNode serves (its name)
PARTITION_ID_KEY = "partition-id"  # node config, simulation: the node's index in the site plan (Flower's key)
NUM_PARTITIONS_KEY = "num-partitions"  # node config, simulation: how many sites the plan has (Flower's key)

# Records (keys of a message's RecordDict).
ARRAYS_RECORD = "arrays"
CONFIG_RECORD = "config"
METRICS_RECORD = "metrics"
PROFILE_RECORD = "profile"
TRAINED_RECORD = "trained"
PERSONAL_RECORD = "personal"
ADAPTED_RECORD = "adapted"
PRIVACY_RECORD = "privacy"

# Keys inside records.
SERVER_ROUND = "server-round"
EVALUATE_ROUND = "evaluate-round"  # train config: evaluate the model received first, as this round's
EVALUATED = "evaluated-"  # train reply: the prefix of that evaluation's records
RESTORE_ROUND = "restore-round"  # handshake: restore your own saved state of this round
SCHEMA_KEY = "schema"  # handshake profile: the site's corpus schema, as JSON; site-local train/evaluate
# config: the federation's schema the site builds its model for
VERSION_KEY = "version"  # handshake profile: the site's multimed-fl version
# The handshake profile's other keys (PROFILE_RECORD; clients/client_app.py, federated/server/handshake.py)
PROFILE_SITE = "site"
PROFILE_ROLE = "role"  # a Role's value
PROFILE_ARCHETYPE = "archetype"
PROFILE_ORIGIN_SITE = "origin_site"
PROFILE_MODALITIES = "modalities"
PROFILE_TASKS = "tasks"
PROFILE_N_TRAIN = "n_train"
PROFILE_N_TEST = "n_test"
STATS_REQUEST = "stats-request"  # statistics round: JSON list of regression tasks -> <task>/n, /mean, /m2
STATS_CENTRE = "stats-centre"  # statistics round: JSON {task: mean} -> <task>/absdev
TARGET_SCALES = "target-scales"  # site-local train/evaluate config: JSON {task: [mean, std, mad]}
# Feature statistics round (federated/server/feature_round.py), before training in every engine; a site
# answers each of the two queries once per run (the same query again: the same reply; another: refused):
# query: JSON {modalities, min_count, epsilon, seed} -> <modality>/n, /mean, /m2 (one value per feature);
# simulation, preprocess.statistics=pooled: {modalities, scope: "pooled", medians} -> the same, + <modality>/median
FEATURE_MOMENTS = "feature-moments"
# query: JSON {modalities: {modality: {lo, width}}, min_count, epsilon, seed} -> <modality>/hist (features x bins,
# coarsened: runs of whole 64-bin blocks holding >= min_count values each, feature_stats.coarsened)
FEATURE_HISTOGRAM = "feature-histogram"
FEATURE_STATS = "feature-stats"  # train/evaluate config: JSON {modality: {mean, std, fill}}
# `multimed-fl stats` (a statistics-only run): JSON request -> the site's profile, aggregates only
PROFILE_REQUEST = "profile-request"
# (clients/site_profile.py): query CONFIG_RECORD {PROFILE_REQUEST: JSON {phase, min_count, epsilon, bins?, grid?}}
# -> CONFIG_RECORD
# {PROFILE_REPLY: JSON counts | sent features}, ARRAYS_RECORD (packed: <modality>/observed, /moments, /hist)
PROFILE_REPLY = "profile-reply"
PROFILE_COARSE_BINS = 64  # a profile's histograms under DP (HIST_BINS / 64 fine bins each); its reports' finest grid
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train_loss"
STEPS = "steps"
GROUPS = "groups"
GROUP_EXAMPLES = "examples"
# Secure aggregation (federated/server/secure_round.py): how a site builds the one vector it masks,
# in the collect stage's CONFIG_RECORD (strategies/secure_sums.py)
SECURE_LAYOUT = "secure-layout"  # grouped | single
SECURE_MAX_WEIGHT = "secure-max-weight"  # W: a site's weight per group is min(1, examples / W)
SECURE_UNIFORM = "secure-uniform"  # 1: every group a site trained weighs 1 (strategy.weighting=uniform)
SECURE_CLIP = "secure-clip"  # c: each entry of the update is clipped to [-c, c]
SECURE_CLIP_NORM = "secure-clip-norm"  # site-level DP: the update is first scaled to this L2 norm
SECURE_MAX_NORM = "secure-max-norm"  # strategy.max_update_norm, checked by the site itself (0 = none)
SECURE_WITHHELD = "secure-withheld"  # JSON list: groups too few of the round's sites hold; no site sends them
SECURE_GROUPS_RECORD = "secure-groups"  # site -> server, in the clear: {SECURE_WEIGHTS: JSON object group ->
# the weight a_g > 0 its vector carries}: its keys are the groups it sent, so the server can refuse to unmask a
# group's sum that is one site's update, and its values are what the unmasked sum must match
SECURE_WEIGHTS = "weights"


def report_from_record(record: Any) -> dict[str, Any]:
    """A ConfigRecord's values as plain JSON-able Python values (e.g. a site's privacy report)."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        out[key] = list(value) if isinstance(value, (list, tuple)) else value
    return out


def record_number(record: Any, key: str, default: float | None = None) -> float:
    """The number under `key` of a ConfigRecord or MetricRecord (`default` when absent, if given).

    Record values are typed as any record value (str, bytes, lists...); a message whose number is
    not one is malformed, and the TypeError names the key."""
    value = record[key] if default is None else record.get(key, default)
    if not isinstance(value, (int, float)):
        raise TypeError(f"record key {key!r} holds {value!r}, not a number")
    return float(value)


def record_round(record: Any, key: str = SERVER_ROUND) -> int:
    """A round number of a ConfigRecord (the server's SERVER_ROUND or RESTORE_ROUND)."""
    return int(record_number(record, key))
