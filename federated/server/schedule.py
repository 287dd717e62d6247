"""When a round's model is scored: the round loop's schedule, one object chosen once per run.

The loop (federated/server/loop.py) is the same for every run: begin, then for each round train,
accept the new model, hand it to the schedule; then end. The schedule decides the rest:

    EvaluateApart      every model is scored in an exchange of its own right after its training
                       (round 0 first), so a round is two exchanges; under secure aggregation its
                       training is the secure round (federated/server/secure_train.py).
    EvaluateWithTrain  engine.evaluate_with_train, in a deployment: round r's model is scored in
                       round r+1's exchange (the last round's on its own), so a deployed round is
                       one exchange. Its records, checkpoints and scores are EvaluateApart's; they
                       reach the callbacks one exchange later.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from flwr.app import ArrayRecord

from federated.server.callbacks import Callback, SavedStrategyState, ServerState
from federated.server.checkpoint import Checkpoint, restore_python_rng
from federated.server.evaluation import SiteEvaluation
from federated.server.records import RoundRecord
from federated.server.round import (
    Federation,
    TrainOutcome,
    evaluate_round,
    round_record,
    timed_evaluation,
    train_round,
    train_round_evaluating,
)
from federated.server.secure_train import secure_train_round
from federated.server.transport import over_superlink
from strategies.round_strategy import RoundStrategy

TrainRound = Callable[[Federation, int, ArrayRecord], TrainOutcome]


class Schedule(Protocol):
    """What the round loop calls, in this order: begin, (train, trained) per round, end."""

    def begin(self, arrays: ArrayRecord, resume: Checkpoint | None) -> tuple[int, ArrayRecord]:
        """The last round done (0, or the checkpoint's) and the model the next one starts from."""
        ...

    def train(self, rnd: int, arrays: ArrayRecord) -> TrainOutcome:
        """Round `rnd`'s training of `arrays`."""
        ...

    def trained(self, rnd: int, arrays: ArrayRecord, outcome: TrainOutcome) -> None:
        """Round `rnd` produced `arrays` (the model the next round starts from)."""
        ...

    def end(self, arrays: ArrayRecord) -> tuple[RoundRecord, list[RoundRecord]]:
        """After the last round (`arrays` its model): the run's initial record and its round records."""
        ...


def schedule_for(fed: Federation, callbacks: Sequence[Callback]) -> Schedule:
    """The run's schedule: EvaluateWithTrain where engine.evaluate_with_train applies (in a
    deployment, a SuperLink, and not under secure aggregation, whose train messages are four stages
    around a masked update), else EvaluateApart with the plain or the secure training round."""
    secure = fed.cfg.secure_aggregation.name != "none"
    if fed.cfg.engine.evaluate_with_train and not secure and over_superlink(fed.grid):
        return EvaluateWithTrain(fed, callbacks)
    return EvaluateApart(fed, callbacks, secure_train_round if secure else train_round)


class _Records:
    """What every schedule keeps: the run, its callbacks, its initial record and its round records."""

    def __init__(self, fed: Federation, callbacks: Sequence[Callback]) -> None:
        self.fed, self.callbacks = fed, callbacks
        self.initial: RoundRecord | None = None  # round 0's record, once it is scored
        self.history: list[RoundRecord] = []

    def resumed(self, resume: Checkpoint) -> tuple[int, ArrayRecord]:
        """The state a checkpoint holds (the sites restored theirs in the handshake)."""
        self.fed.strategy.load_state_dict(resume.strategy_state)
        restore_python_rng(resume.python_rng)
        for cb in self.callbacks:
            cb.on_resume([resume.initial, *resume.history])
        self.initial, self.history = resume.initial, list(resume.history)
        return resume.round, resume.array_record()

    def records(self) -> tuple[RoundRecord, list[RoundRecord]]:
        assert self.initial is not None  # round 0 is scored (or restored) before any round ends
        return self.initial, self.history


class EvaluateApart(_Records):
    """Train, then score the new model in an exchange of its own; the callbacks get the round's
    record, then the server's state."""

    def __init__(self, fed: Federation, callbacks: Sequence[Callback], train: TrainRound) -> None:
        super().__init__(fed, callbacks)
        self.train_round = train

    def begin(self, arrays: ArrayRecord, resume: Checkpoint | None) -> tuple[int, ArrayRecord]:
        if resume is not None:
            return self.resumed(resume)
        self.initial = evaluate_round(self.fed, 0, arrays, self.callbacks)
        return 0, arrays

    def train(self, rnd: int, arrays: ArrayRecord) -> TrainOutcome:
        return self.train_round(self.fed, rnd, arrays)

    def trained(self, rnd: int, arrays: ArrayRecord, outcome: TrainOutcome) -> None:
        self.history.append(evaluate_round(self.fed, rnd, arrays, self.callbacks, outcome))
        initial, history = self.records()
        state = ServerState(rnd, arrays, self.fed.strategy, initial, history)
        for cb in self.callbacks:
            cb.on_server_state(state)

    def end(self, arrays: ArrayRecord) -> tuple[RoundRecord, list[RoundRecord]]:
        return self.records()


@dataclass
class _Unscored:
    """A round whose model the sites have not scored yet: its evaluation rides on the next round's
    training, and the server's state after it, copied before the next round configures anything,
    goes to the callbacks once its record is complete."""

    round: int
    arrays: ArrayRecord
    outcome: TrainOutcome | None  # None for round 0
    strategy: SavedStrategyState
    python_rng: Any

    @classmethod
    def after(cls, rnd: int, arrays: ArrayRecord, outcome: TrainOutcome | None, strategy: RoundStrategy) -> _Unscored:
        return cls(rnd, arrays, outcome, SavedStrategyState(copy.deepcopy(strategy.state_dict())), random.getstate())


class EvaluateWithTrain(_Records):
    """Score round r's model in round r+1's exchange (engine.evaluate_with_train)."""

    def __init__(self, fed: Federation, callbacks: Sequence[Callback]) -> None:
        super().__init__(fed, callbacks)
        self.unscored: _Unscored | None = None

    def begin(self, arrays: ArrayRecord, resume: Checkpoint | None) -> tuple[int, ArrayRecord]:
        if resume is not None:  # the checkpoint's round was scored before it was saved
            return self.resumed(resume)
        self.unscored = _Unscored.after(0, arrays, None, self.fed.strategy)
        return 0, arrays

    def train(self, rnd: int, arrays: ArrayRecord) -> TrainOutcome:
        if self.unscored is None:
            return train_round(self.fed, rnd, arrays)
        outcome, evals, failures = train_round_evaluating(self.fed, rnd, arrays, self.unscored.round)
        self._scored(self.unscored, evals, failures)
        return outcome

    def trained(self, rnd: int, arrays: ArrayRecord, outcome: TrainOutcome) -> None:
        self.unscored = _Unscored.after(rnd, arrays, outcome, self.fed.strategy)

    def end(self, arrays: ArrayRecord) -> tuple[RoundRecord, list[RoundRecord]]:
        if self.unscored is not None:
            unscored = self.unscored
            late = unscored.outcome.unanswered if unscored.outcome is not None else set()
            self._scored(unscored, *timed_evaluation(self.fed, arrays, unscored.round, late))
        return self.records()

    def _scored(self, unscored: _Unscored, evals: list[SiteEvaluation], failures: dict[str, str]) -> None:
        """An unscored round's record, now that its evaluations came, to the callbacks; after a
        training round, the callbacks then get the server's state as it was after that round."""
        record = round_record(unscored.round, evals, failures, self.callbacks, unscored.outcome)
        if unscored.outcome is None:
            self.initial = record
            return
        self.history.append(record)
        initial, history = self.records()
        state = ServerState(
            unscored.round, unscored.arrays, unscored.strategy, initial, list(history), unscored.python_rng
        )
        for cb in self.callbacks:
            cb.on_server_state(state)
