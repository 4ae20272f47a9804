"""Server-side strategies: partial training over the splitting engine, and metered FedAvg.

``SubmodelStrategy`` runs every partial-training method (MSfusion and the
baselines differ only in their index policy): it plans one sub-model per
sampled participant at that participant's budget, sends each one its own
message with only its slices, checks every reply against the plan sent to that
node (:mod:`.replies`) as it arrives, and fuses the replies with overlap-aware
aggregation (:mod:`msfusion_flwr.engine.fusion`), folded into running sums
as they arrive where the rule allows (:mod:`.folding`). ``MeteredFedAvg`` is Flower's FedAvg,
unchanged, with the same per-round accounting (:mod:`.accounting`). FedDF's
subclass lives in :mod:`.feddf`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from logging import INFO
from typing import ClassVar

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy
from flwr.supercore import log

from ..config import ConfigError
from ..engine.coverage import zero_outside
from ..engine.fusion import PLAIN, SubmodelUpdate, aggregate, aggregate_screened
from ..engine.groups import IndexPlan, SplitSpec
from ..engine.policies import BudgetError, IndexPolicy, PlanRequest
from ..engine.robust import AggregationRule
from ..engine.slicing import slice_state
from ..protocol import ARRAYS, CONFIG, METRICS, PLAN, SERVER_ROUND, SPLIT_RATE, encode_plan
from .accounting import TrafficMeter
from .folding import RoundFold, reply_problem, silence
from .nodes import Budgets, NodeDirectory, NodeProfile, wait_for_nodes
from .privacy import noise_generator
from .replies import TRAIN_METRICS, ReplySummary, training_metrics


class SubmodelStrategy(Strategy):
    """Partial training over the splitting engine: one index policy per method.

    Each round: sample participants (seeded), rank them by partition id, ask
    the policy for each one's plan at its budget, send each one only its
    slices, check every reply against its plan, and fuse the accepted replies
    with overlap-aware aggregation under ``rule`` (plain averaging, or a robust
    rule: :mod:`msfusion_flwr.engine.robust`). With ``calibrate``
    (``output-scaling = "calibrated"``) the engine keeps the output layer on
    the slices' scale.

    Replies reach the round's :class:`~.folding.RoundFold` one by one through
    :meth:`receive_train` as the round loop pulls them
    (:func:`~.rounds.run_rounds`), or all at once through
    :meth:`aggregate_train`; either way they are fused in rank order.
    """

    holds_updates: ClassVar[bool] = False
    """Whether the strategy needs the round's accepted updates after fusing them (they are then held, not folded)."""

    def __init__(
        self,
        spec: SplitSpec,
        policy: IndexPolicy,
        budgets: Budgets,
        fraction_train: float = 1.0,
        min_available_nodes: int = 2,
        seed: int = 0,
        query_timeout: float | None = None,
        node_wait_timeout: float = math.inf,
        calibrate: bool = False,
        rule: AggregationRule = PLAIN,
    ) -> None:
        self.spec = spec
        self.calibrate = calibrate
        self.rule = rule
        self.policy = policy
        self.budgets = budgets
        self.fraction_train = fraction_train
        self.min_available_nodes = min_available_nodes
        self.seed = seed
        self.node_wait_timeout = node_wait_timeout
        self.nodes = NodeDirectory(query_timeout)
        self.meter = TrafficMeter()
        self._global: dict[str, torch.Tensor] = {}
        self._plans: dict[int, IndexPlan] = {}
        self._rates: dict[int, float] = {}
        self._expected: dict[int, dict[str, tuple[tuple[int, ...], str]]] = {}
        self._fold: RoundFold | None = None
        self._accepted: dict[int, SubmodelUpdate] = {}
        self.max_examples = math.inf
        """The most examples a reply may claim (the run's training examples, set before round 1 when the server knows them)."""

    def summary(self) -> None:
        log(INFO, "\t├── policy %s, budgets %s", self.policy, self.budgets)
        log(INFO, "\t├── width groups %s", self.spec.widths)
        log(INFO, "\t├── aggregation %s", self.rule)
        log(INFO, "\t└── fraction-train %.2f, min available nodes %d", self.fraction_train, self.min_available_nodes)

    @property
    def profiles(self) -> dict[int, NodeProfile]:
        """The profiles of the nodes seen so far (node id -> profile)."""
        return self.nodes.profiles

    def initial_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The global model to start from: ``state``, with calibrated output layers scaled so that slices start
        from the layers' default initialisation, and the elements no plan of the policy can hold (its
        ``support``, where it has one) at zero.

        Calibrated slicing divides an output layer by the fraction f of its
        inputs a slice holds; starting the global layer at f times its default
        initialisation (f of a participant at the run's ``split-ratio``) makes a
        slice start exactly where a plain narrow model would.
        """
        support = getattr(self.policy, "support", None)
        if support is not None:
            state = zero_outside(state, self.spec, support(self.spec.widths))
        if not self.calibrate:
            return state
        request = PlanRequest(self.spec.widths, self.budgets.default, 0, 1, 1, 0, self.seed)
        factors = self.spec.calibration(self.policy.assign(request).plan)
        return {k: v * factors[k] if k in factors else v for k, v in state.items()}

    def profile(self, node: int) -> NodeProfile:
        """A node's profile (:meth:`NodeDirectory.profile`)."""
        return self.nodes.profile(node)

    def sample_participants(self, server_round: int, grid: Grid) -> list[int]:
        """This round's participants, ordered by partition id (their rank).

        A seeded sample of ``int(N * fraction-train)`` (at least one) of the N
        connected nodes, so the same run config samples the same partitions.
        """
        nodes = wait_for_nodes(grid, self.min_available_nodes, self.node_wait_timeout)
        self.nodes.learn(grid, nodes)
        ordered = sorted(nodes, key=self.nodes.rank_key)
        size = max(1, int(len(ordered) * self.fraction_train))
        rng = random.Random(f"{self.seed}:{server_round}")
        return [ordered[i] for i in sorted(rng.sample(range(len(ordered)), size))]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One message per participant, carrying only its slices and its plan."""
        return list(self.train_messages(server_round, arrays, config, grid))

    def train_messages(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterator[Message]:
        """:meth:`configure_train`'s messages in rank order, each sliced only when it is taken.

        The round is planned now (participants, plans, the round's fold); a
        message's slices exist from the moment it is taken, so a round loop that
        pushes messages in waves (``messages-in-flight``) holds only those in
        flight, not one sub-model per participant.
        """
        participants = self.sample_participants(server_round, grid)
        self._global = arrays.to_torch_state_dict()
        self._plans, self._rates, self._expected = {}, {}, {}
        for rank, node in enumerate(participants):
            profile = self.profile(node)
            request = PlanRequest(
                widths=self.spec.widths,
                ratio=self.budgets.ratio(profile),
                rank=rank,
                num_participants=len(participants),
                server_round=server_round,
                partition_id=profile.partition_id,
                seed=self.seed,
            )
            try:
                assignment = self.policy.assign(request)
            except BudgetError as error:
                raise ConfigError(str(error)) from None
            self._plans[node] = assignment.plan
            self._rates[node] = assignment.rate
        self.meter.opened(server_round, sampled=len(participants))
        self._fold = RoundFold(
            server_round, self._global, self.spec, self._plans, self._expected, self.nodes, self.rule,
            self.calibrate, self.max_examples, hold=self.holds_updates,
        )  # fmt: skip
        return self._sliced_messages(server_round, config)

    def _sliced_messages(self, server_round: int, config: ConfigRecord) -> Iterator[Message]:
        """The planned round's messages, in rank order, each sliced as it is taken and recorded as sent."""
        for node, plan in self._plans.items():
            sub_state = slice_state(self._global, self.spec, plan, self.calibrate)
            self._expected[node] = {k: (tuple(v.shape), str(v.numpy().dtype)) for k, v in sub_state.items()}
            train_config = ConfigRecord({**config, SERVER_ROUND: server_round, SPLIT_RATE: self._rates[node]})
            content = RecordDict(
                {ARRAYS: ArrayRecord(sub_state), CONFIG: train_config, PLAN: encode_plan(plan, self.spec.widths)}
            )
            message = Message(content, dst_node_id=node, message_type=MessageType.TRAIN)
            self.meter.sent_one(server_round, message)
            yield message

    def receive_train(self, server_round: int, reply: Message) -> None:
        """Check one reply of the round as it arrives, and fold it into the round's sums where the rule allows."""
        self._round_fold(server_round).add(reply)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Overlap-aware aggregation of the replies that match their plans: those given here and those
        :meth:`receive_train` took (the accepted updates are kept in ``_accepted`` where the strategy holds them).

        Replies are fused in rank order, not arrival order, so the float sums
        (and the run) are reproducible.
        """
        fold = self._round_fold(server_round)
        self._fold = None
        for reply in replies:
            fold.add(reply)
        accepted, failures = fold.close()
        self.meter.received(server_round, accepted, failures)
        self.meter.rounds[server_round].plans = [self._plans[r.node] for r in accepted]
        self._accepted = fold.updates()
        if not accepted:
            return None, None
        self._accepted = self.prepare_updates(server_round, self._accepted, {r.node: r for r in accepted})
        noise = noise_generator() if self.rule.noise_std > 0 else None
        if fold.running is not None:
            merged = fold.running.result(noise)
        elif self.rule.screen:
            updates = list(self._accepted.values())
            merged, dropped = aggregate_screened(self._global, self.spec, updates, self.calibrate, self.rule)
            if dropped:
                names = [self.nodes.describe(accepted[k].node) for k in dropped]
                log(INFO, "round %d: screened out (update against the round's consensus): %s", server_round, "; ".join(names))
                traffic = self.meter.rounds[server_round]
                traffic.plans = [u.plan for k, u in enumerate(updates) if k not in dropped]
                traffic.screened = [int(accepted[k].metrics["partition-id"]) for k in dropped]
        else:
            merged = aggregate(self._global, self.spec, list(self._accepted.values()), self.calibrate, self.rule, noise)
        return ArrayRecord(merged), training_metrics(accepted)

    def prepare_updates(
        self, server_round: int, updates: dict[int, SubmodelUpdate], replies: Mapping[int, ReplySummary]
    ) -> dict[int, SubmodelUpdate]:
        """The held updates (node -> update, rank order) as fusion takes them: unchanged here; a subclass may
        rescore them (:class:`~.trust.ReferenceTrust`), with what their replies said (``replies``, by node)."""
        return updates

    def _round_fold(self, server_round: int) -> RoundFold:
        if self._fold is None or self._fold.server_round != server_round:
            raise RuntimeError(f"round {server_round}: replies before configure_train planned the round")
        return self._fold

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """No federated evaluation: the server evaluates the global model."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None


class MeteredFedAvg(FedAvg):
    """Flower's FedAvg, unchanged, plus per-round traffic accounting and a bounded wait for nodes.

    Flower's own wait for ``min_available_nodes`` has no end; this one gives up
    after ``node_wait_timeout`` seconds (:func:`~.nodes.wait_for_nodes`) before
    Flower's sampling runs. ``nodes`` learns the nodes' profiles for the run's
    start-up checks; FedAvg itself does not use them.
    """

    def __init__(self, node_wait_timeout: float = math.inf, query_timeout: float | None = None, **kwargs: object) -> None:
        super().__init__(fraction_evaluate=0.0, **kwargs)  # type: ignore[arg-type]
        self.meter = TrafficMeter()
        self.node_wait_timeout = node_wait_timeout
        self.nodes = NodeDirectory(query_timeout)
        self.max_examples = math.inf
        """The most examples a reply may claim (as :attr:`SubmodelStrategy.max_examples`)."""
        self._expected: dict[int, dict[str, tuple[tuple[int, ...], str]]] = {}

    @property
    def profiles(self) -> dict[int, NodeProfile]:
        """The profiles of the nodes seen so far (node id -> profile)."""
        return self.nodes.profiles

    def initial_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The global model to start from: ``state`` itself (the full model needs no calibration)."""
        return state

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        wait_for_nodes(grid, self.min_available_nodes, self.node_wait_timeout)
        messages = list(super().configure_train(server_round, arrays, config, grid))
        shapes = {k: (tuple(a.shape), str(a.dtype)) for k, a in arrays.items()}
        self._expected = {m.metadata.dst_node_id: shapes for m in messages}
        self.meter.sent(server_round, messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's FedAvg over the replies that pass :func:`~.replies.check_reply` against the full model sent.

        The others are left out with their reasons (Flower's own checks would
        stop the run on one inconsistent reply); the accepted replies' metrics
        are narrowed to the training metrics they all carry, which is what
        Flower's FedAvg requires.
        """
        accepted, failures = screen_replies(list(replies), self._expected, self.nodes, self.max_examples)
        self.meter.received(server_round, [ReplySummary.of(r) for r in accepted], failures)
        common = set(TRAIN_METRICS).intersection(*(r.content[METRICS].keys() for r in accepted)) if accepted else set()
        for reply in accepted:
            metrics = reply.content[METRICS]
            reply.content = RecordDict({ARRAYS: reply.content[ARRAYS], METRICS: MetricRecord({k: metrics[k] for k in common})})
        return super().aggregate_train(server_round, accepted)


def screen_replies(
    replies: Sequence[Message],
    expected: Mapping[int, Mapping[str, tuple[tuple[int, ...], str]]],
    nodes: NodeDirectory,
    max_examples: float,
) -> tuple[list[Message], list[str]]:
    """The replies that pass :func:`~.replies.check_reply` (in the order given), and one reason per other reply
    and per sampled node that did not reply.

    ``expected`` maps each sampled node to the arrays it was sent (name ->
    shape, dtype); a reply from any other node is left out as not sampled.
    """
    accepted, failures = [], []
    for reply in replies:
        reason = reply_problem(reply, expected, nodes, max_examples)
        if reason is None:
            accepted.append(reply)
        else:
            failures.append(f"{nodes.describe(reply.metadata.src_node_id)}: {reason}")
    replied = {reply.metadata.src_node_id for reply in replies}
    return accepted, failures + silence(nodes, sorted(set(expected) - replied, key=nodes.rank_key))
