"""One SecAgg+ training round, driven from our round loop with Flower's own cryptography.

The server side of Flower's SecAgg+ (flwr.server.workflow.SecAggPlusWorkflow) is bound to the
legacy API: it needs a LegacyContext with a legacy Strategy, ClientManager and FitIns, and returns
only the mean it hands to `aggregate_fit`. It also sends one shared message content to every node
(secaggplus_mod pops a key from it: in-process the second node fails), and a node that drops
before the collect stage is later treated as dead, which fails the round. So the four stages are
sequenced here, with this project's `exchange` (replies charged to their nodes, short pulls), a
fresh content per node, and the bookkeeping below; every primitive is Flower's: key agreement
(`generate_shared_key`, `bytes_to_*_key`), Shamir (`combine_shares`), the mask generator
(`pseudo_rand_gen`), modular vector arithmetic and `dequantize`. The site side is Flower's
`secaggplus_mod` unchanged (clients/secure_aggregation.py).

Who is in the sum, stage by stage (U1 > U2 > U3 are the nodes that answered each stage):
    setup       every sampled node sends two public keys                    -> U1
    share keys  each node of U1 gets its neighbours' keys, sends each an
                encrypted share of its mask seed and of its private key     -> U2
    collect     each node of U2 gets the shares addressed to it (from U2),
                trains, and sends its masked vector                          -> U3: the sum
    unmask      each node of U3 sends, for its neighbours, the seed share of
                those in U3 and the key share of those in U2 - U3 (they
                shared keys, then dropped: their pairwise masks must go)
A node that left before the collect stage simply is not in the sum (it masked nothing). A secret
needs `threshold` shares; with fewer, the round fails with the stage and the counts.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.common.secure_aggregation.ndarrays_arithmetic import (
    factor_extract,
    get_parameters_shape,
    parameters_addition,
    parameters_mod,
    parameters_subtraction,
)
from flwr.common.secure_aggregation.quantization import dequantize
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

from federated.core.config.schema import SecureAggregationConfig
from federated.core.flower_door import private_key_from_bytes, public_key_from_bytes
from federated.core.protocol import CONFIG_RECORD
from federated.core.replies import error_reason
from federated.server.transport import lost_reply
from strategies.secure_sums import quantization_levels, sites_capacity

Send = Callable[[list[Message]], list[Message]]  # push messages, return the replies that came
# Called with the collect stage's replies (node -> content) before any share is asked for: a reason
# not to unmask this sum (e.g. a group only one site sent), or None.
BeforeUnmask = Callable[[dict[int, RecordDict]], str | None]


@dataclass(frozen=True)
class ProtocolSizes:
    """How many neighbours hold shares of each node's secrets, and how many shares recover one."""

    num_shares: int
    threshold: int

    @classmethod
    def for_round(cls, n_sites: int, sa: SecureAggregationConfig) -> ProtocolSizes:
        """Flower's rules (SecAggPlusWorkflow.setup_stage): a fraction of the sampled sites, made
        odd, or all of them when that is 2 or fewer; the threshold a fraction of that, at least 2,
        and here also more than half the shares. Flower's mod answers whatever unmask lists it is
        sent, so with half the shares or fewer a server could ask some neighbours for a site's seed
        shares and the others for its key shares, recover both, and unmask that site's vector alone
        (the loader refuses a configured threshold below this; rounding a fraction can still fall
        to half, e.g. 0.6 of 4 shares -> 2: raised to 3)."""
        if sa.num_shares <= 1:
            shares = round(sa.num_shares * n_sites)
            if shares < n_sites and shares % 2 == 0:
                shares += 1
            if shares <= 2:
                shares = n_sites
        else:
            shares = min(int(sa.num_shares), n_sites)
        if sa.reconstruction_threshold <= 1:
            threshold = max(2, round(sa.reconstruction_threshold * shares))
        else:
            threshold = int(sa.reconstruction_threshold)
        return cls(shares, min(max(threshold, shares // 2 + 1), shares))


@dataclass
class SecureSum:
    """What a secure round gives the server: the sum of the surviving sites' vectors (dequantised),
    never one site's vector; the collect-stage replies (scalar metrics only); who left and why."""

    summed: np.ndarray | None  # None when the round failed
    survivors: list[int]  # nodes whose vectors are in the sum
    replies: list[Message]  # collect stage: metrics and DP reports, no update
    failures: dict[int, str] = field(default_factory=dict)  # node -> the stage it left in, and why
    reason: str = ""  # why no sum could be formed
    levels: int = 0  # T, the quantisation levels the round used
    late: dict[int, str] = field(default_factory=dict)  # survivors lost in the unmask stage (still in the sum)
    # Nodes that did not answer a stage (no reply, or one whose content was lost: transport.lost_reply),
    # dead or still busy: the round's evaluation awaits them briefly, not a whole timeout again
    unanswered: set[int] = field(default_factory=set)
    # The same sum before dequantisation: integers mod M, where an all-zero entry is exact (the
    # server's checks on the sum read it: strategies/secure_sums.py, sum_problems)
    quantised: np.ndarray | None = None


class _Round:
    def __init__(
        self,
        send: Send,
        train: Sequence[Message],
        sa: SecureAggregationConfig,
        seed: int,
        before_unmask: BeforeUnmask | None = None,
    ) -> None:
        self.send, self.sa, self.before_unmask = send, sa, before_unmask
        self.train = {m.metadata.dst_node_id: m for m in train}
        nodes = list(self.train)
        self.sizes = ProtocolSizes.for_round(len(nodes), sa)
        self.levels = quantization_levels(len(nodes), sa.quantization_range, sa.modulus_range)
        random.Random(seed).shuffle(nodes)  # neighbours on a ring, as Flower's; seeded: reproducible
        half = self.sizes.num_shares // 2
        self.neighbours = {
            nid: {nodes[(i + k) % len(nodes)] for k in range(-half, half + 1)} for i, nid in enumerate(nodes)
        }
        self.public_keys: dict[int, tuple[bytes, bytes]] = {}
        self.failures: dict[int, str] = {}
        self.unanswered: set[int] = set()  # nodes that gave a stage no reply (SecureSum.unanswered)
        self.replies: dict[int, Message] = {}  # each node's latest reply
        self.collected: list[Message] = []  # the collect stage's replies: scalar metrics, no update

    def message(self, nid: int, configs: dict[str, Any], base: RecordDict | None = None) -> Message:
        """A fresh content per node (secaggplus_mod pops from its configs record), always with the
        round's config record (the fault mod and the engines read the round from it)."""
        content = RecordDict(dict(base.items())) if base is not None else RecordDict()
        if base is None:
            content[CONFIG_RECORD] = self.train[nid].content.config_records[CONFIG_RECORD]
        content[RECORD_KEY_CONFIGS] = ConfigRecord(configs)
        return Message(content, dst_node_id=nid, message_type=MessageType.TRAIN)

    def exchange(self, stage: str, messages: list[Message]) -> dict[int, RecordDict]:
        """Send one stage; the nodes that answered it, with their replies' content."""
        asked = {m.metadata.dst_node_id for m in messages}
        answered: dict[int, RecordDict] = {}
        for reply in self.send(messages):
            nid = reply.metadata.src_node_id
            if reply.has_error():
                self.failures[nid] = f"{stage} stage: {error_reason(reply)}"
                if lost_reply(reply):
                    self.unanswered.add(nid)
            else:
                answered[nid] = reply.content
                self.replies[nid] = reply
        for nid in asked - set(answered) - set(self.failures):
            self.failures[nid] = f"{stage} stage: no reply"
            self.unanswered.add(nid)
        return answered

    def enough_neighbours(self, alive: set[int], stage: str) -> set[int]:
        """The nodes of `alive` with at least `threshold` live neighbours (itself included); the
        others cannot share or recover secrets and leave the round."""
        alive = set(alive)
        while True:
            short = {n for n in alive if len(self.neighbours[n] & alive) < self.sizes.threshold}
            if not short:
                return alive
            for n in short:
                self.failures[n] = (
                    f"{stage} stage: fewer than the threshold of {self.sizes.threshold} neighbours left "
                    "(secure_aggregation.reconstruction_threshold)"
                )
            alive -= short

    def run(self) -> SecureSum:
        n, sa = len(self.train), self.sa
        if n < 2:
            return SecureSum(None, [], [], reason=f"secure aggregation needs at least 2 sites in a round, got {n}")
        overflow = sites_capacity(n, self.levels, sa.modulus_range)
        if overflow:
            return SecureSum(None, [], [], reason=overflow)
        u2, forward = self.share_keys(self.setup())
        u3, total = self.collect(u2, forward)
        if len(u3) < self.sizes.threshold:
            return self.failed(
                u3,
                f"collect stage: {len(u3)} of {n} sites sent a masked vector, fewer than the threshold "
                f"{self.sizes.threshold} (secure_aggregation.reconstruction_threshold)",
            )
        if self.before_unmask is not None:
            veto = self.before_unmask({m.metadata.src_node_id: m.content for m in self.collected})
            if veto:
                return self.failed(u3, f"not unmasked: {veto}")
        unmasked = self.unmask(u3, u2 - u3, total)
        if isinstance(unmasked, str):
            return self.failed(u3, unmasked)
        summed, quantised = unmasked
        late = {nid: why for nid, why in self.failures.items() if nid in u3}
        failures = {nid: why for nid, why in self.failures.items() if nid not in u3}
        return SecureSum(
            summed,
            sorted(u3),
            self.collected,
            failures,
            levels=self.levels,
            late=late,
            quantised=quantised,
            unanswered=set(self.unanswered),
        )

    def setup(self) -> set[int]:
        """Stage 0: the protocol's sizes out, two public keys back from each node."""
        sa, sizes = self.sa, self.sizes
        configs = {
            Key.STAGE: Stage.SETUP,
            Key.SAMPLE_NUMBER: len(self.train),
            Key.SHARE_NUMBER: sizes.num_shares,
            Key.THRESHOLD: sizes.threshold,
            Key.CLIPPING_RANGE: float(sa.clipping_range),
            Key.TARGET_RANGE: int(self.levels),
            Key.MOD_RANGE: int(sa.modulus_range),
            # every site's Flower weight is 1 (its own weights travel inside its vector), so the mod
            # neither scales the vector nor adds a weight factor other than T
            Key.MAX_WEIGHT: 1.0,
        }
        answered = self.exchange(Stage.SETUP, [self.message(nid, dict(configs)) for nid in self.train])
        for nid, content in answered.items():
            keys = content.config_records[RECORD_KEY_CONFIGS]
            self.public_keys[nid] = (cast(bytes, keys[Key.PUBLIC_KEY_1]), cast(bytes, keys[Key.PUBLIC_KEY_2]))
        return self.enough_neighbours(set(answered), Stage.SETUP)

    def share_keys(self, u1: set[int]) -> tuple[set[int], dict[int, tuple[list[int], list[bytes]]]]:
        """Stage 1: each node gets its live neighbours' keys and sends them encrypted shares of its
        secrets; the shares from nodes that finished this stage, by destination."""

        def message(nid: int) -> Message:
            keys: dict[str, Any] = {str(j): list(self.public_keys[j]) for j in self.neighbours[nid] & u1}
            return self.message(nid, {**keys, Key.STAGE: Stage.SHARE_KEYS})

        answered = self.exchange(Stage.SHARE_KEYS, [message(nid) for nid in sorted(u1)])
        u2 = self.enough_neighbours(set(answered) & u1, Stage.SHARE_KEYS)
        forward: dict[int, tuple[list[int], list[bytes]]] = {nid: ([], []) for nid in u2}
        for src in sorted(u2):
            res = answered[src].config_records[RECORD_KEY_CONFIGS]
            destinations = cast(list[int], res[Key.DESTINATION_LIST])
            for dst, ciphertext in zip(destinations, cast(list[bytes], res[Key.CIPHERTEXT_LIST]), strict=True):
                if dst in forward and dst != src:
                    forward[dst][0].append(src)
                    forward[dst][1].append(ciphertext)
        return u2, forward

    def collect(
        self, u2: set[int], forward: dict[int, tuple[list[int], list[bytes]]]
    ) -> tuple[set[int], list[np.ndarray]]:
        """Stage 2: each node gets its shares with its training message, trains, and sends its
        masked vector; the nodes that did, and the sum of their vectors (still masked)."""

        def message(nid: int) -> Message:
            srcs, ciphertexts = forward[nid]
            configs = {Key.STAGE: Stage.COLLECT_MASKED_VECTORS, Key.CIPHERTEXT_LIST: ciphertexts, Key.SOURCE_LIST: srcs}
            return self.message(nid, configs, base=self.train[nid].content)

        answered = self.exchange(Stage.COLLECT_MASKED_VECTORS, [message(nid) for nid in sorted(u2)])
        u3 = set(answered) & u2
        self.collected = [self.replies[nid] for nid in sorted(u3)]
        total: list[np.ndarray] = []
        for nid in sorted(u3):
            masked = cast(list[bytes], answered[nid].config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS])
            vector = [bytes_to_ndarray(b) for b in masked]
            total = parameters_addition(total, vector) if total else vector
        return u3, parameters_mod(total, self.sa.modulus_range) if total else total

    def unmask(self, u3: set[int], dead: set[int], total: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray] | str:
        """Stage 3: shares of the live nodes' seeds and of the dead nodes' keys; the masks removed,
        the sum dequantised (and as it was before). Or why it could not be."""
        sa, threshold = self.sa, self.sizes.threshold

        def message(nid: int) -> Message:
            configs = {
                Key.STAGE: Stage.UNMASK,
                Key.ACTIVE_NODE_ID_LIST: sorted(self.neighbours[nid] & u3),
                Key.DEAD_NODE_ID_LIST: sorted(self.neighbours[nid] & dead),
            }
            return self.message(nid, configs)

        answered = self.exchange(Stage.UNMASK, [message(nid) for nid in sorted(u3)])
        shares: dict[int, list[bytes]] = {nid: [] for nid in u3 | dead}
        for content in answered.values():
            res = content.config_records[RECORD_KEY_CONFIGS]
            owners = cast(list[int], res[Key.NODE_ID_LIST])
            for owner, share in zip(owners, cast(list[bytes], res[Key.SHARE_LIST]), strict=True):
                if owner in shares:
                    shares[owner].append(share)
        short = {nid: len(s) for nid, s in shares.items() if len(s) < threshold}
        if short:
            return (
                f"unmask stage: {len(answered)} of {len(u3)} sites answered; the secrets of nodes {sorted(short)} "
                f"have {sorted(set(short.values()))} shares, fewer than the threshold {threshold}"
            )
        shapes = get_parameters_shape(total)
        try:
            for nid in sorted(u3):  # its own mask, from its seed
                own = pseudo_rand_gen(combine_shares(shares[nid]), sa.modulus_range, shapes)
                total = parameters_subtraction(total, own)
            for nid in sorted(dead):  # the pairwise masks its live neighbours added against it
                private_key = private_key_from_bytes(combine_shares(shares[nid]))
                for other in sorted((self.neighbours[nid] & u3) - {nid}):
                    key = generate_shared_key(private_key, public_key_from_bytes(self.public_keys[other][0]))
                    mask = pseudo_rand_gen(key, sa.modulus_range, shapes)
                    # `other` added the mask if other > nid, subtracted it otherwise: undo that
                    total = parameters_subtraction(total, mask) if other > nid else parameters_addition(total, mask)
        except ValueError as e:  # combine_shares / key loading on bad shares
            return f"unmask stage: a secret could not be recovered from its shares ({e})"
        factor, (quantised,) = factor_extract(parameters_mod(total, sa.modulus_range))
        if factor != len(u3) * self.levels:
            return (
                f"unmask stage: the unmasked weight factor is {factor}, not {len(u3)} sites x "
                f"{self.levels}: a site's vector or a share is corrupt"
            )
        # each site's entry was x + c scaled to [0, T]: the sum of n sites is S * 2c / T - n * c
        (summed,) = dequantize([quantised], sa.clipping_range, self.levels)
        return summed - (len(u3) - 1) * sa.clipping_range, quantised

    def failed(self, u3: set[int], reason: str) -> SecureSum:
        return SecureSum(
            None, sorted(u3), self.collected, dict(self.failures), reason, self.levels, unanswered=set(self.unanswered)
        )


def secure_sum(
    send: Send,
    train: Sequence[Message],
    sa: SecureAggregationConfig,
    seed: int,
    before_unmask: BeforeUnmask | None = None,
) -> SecureSum:
    """Run the four SecAgg+ stages for the round's training messages (one per sampled node, as the
    strategy made them, their config carrying the SECURE_* keys); `seed` places the neighbours.
    `before_unmask` may veto unmasking once the masked vectors are in (the sum is then never read)."""
    return _Round(send, train, sa, seed, before_unmask).run()
