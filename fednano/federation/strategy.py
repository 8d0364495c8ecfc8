"""FedNanoStrategy: Flower's Strategy interface around the method's objects.

A strategy only aggregates (Flower's rule): it asks the method's topology which nodes train and
what each is sent, builds the messages, parses every reply once (`parse_replies`, shared by
training and evaluation, as Flower's strategies share `_check_and_log_replies`), gates each
training reply through `validate_update`, and lets the method combine the accepted ones.
What the method remembers across rounds (server-optimiser moments, local clients' adapters) is
its `ServerMemory`, which the server checkpoints with every round.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fednano.aggregation import merge_weights, validate_update
from fednano.config import FederationConfig
from fednano.diagnostics import merge_diagnostics
from fednano.federation import keys
from fednano.methods.combiners import Average, ClientDP, ClientDPFisher, ServerMemory
from fednano.methods.registry import METHODS
from fednano.methods.topologies import Update

log = logging.getLogger(__name__)
Tensors = dict[str, torch.Tensor]


@dataclass
class ClientOutcome:
    node_id: int
    partition_id: int | None
    metrics: dict[str, float] = field(default_factory=dict)
    rejected: str | None = None
    info: dict[str, str] = field(default_factory=dict)  # where the client computed (device, name)
    data: dict = field(default_factory=dict)  # what it holds, in numbers: {"train", "test", "labels": {answer: count}}
    theta: Tensors | None = None
    fisher: Tensors | None = None


def data_info(record: object) -> dict:
    """A reply's data-info (sizes and the label histogram), checked; {} if the client sent none."""
    if record is None:
        return {}
    rec = dict(record)  # type: ignore[call-overload]
    labels = json.loads(str(rec["labels"]))
    if not isinstance(labels, dict) or not all(isinstance(v, int) and v >= 0 for v in labels.values()):
        raise ValueError("data-info labels must map answers to counts")
    return {"train": int(keys.number(rec["train"])), "test": int(keys.number(rec["test"])), "labels": labels}


def parse_replies(replies: Iterable[Message], arrays: bool = False, fisher: bool = False) -> list[ClientOutcome]:
    """One outcome per reply: its metrics and client info, and (training) its arrays and Fisher;
    a client error or a malformed reply is recorded as the reason to reject it."""
    outcomes = []
    for msg in replies:
        out = ClientOutcome(msg.metadata.src_node_id, None)
        outcomes.append(out)
        if msg.has_error():
            out.rejected = f"client error: {msg.error.reason}"
            continue
        try:
            out.metrics = {k: keys.number(v) for k, v in msg.content.metric_records[keys.METRICS].items()}
            out.partition_id = int(out.metrics.get(keys.PARTITION_ID, -1))
            out.info = {k: str(v) for k, v in msg.content.config_records.get(keys.CLIENT_INFO, {}).items()}
            out.data = data_info(msg.content.config_records.get(keys.DATA_INFO))
            if arrays:
                out.theta = msg.content.array_records[keys.ARRAYS].to_torch_state_dict()
            if fisher:
                out.fisher = msg.content.array_records[keys.FISHER].to_torch_state_dict()
        except (KeyError, TypeError, ValueError) as e:
            out.rejected = f"malformed reply: {type(e).__name__}: {e}"
    return outcomes


class FedNanoStrategy(Strategy):
    def __init__(self, cfg: FederationConfig, per_node: Callable[[int], dict] | None = None, combine: Average | None = None) -> None:
        """per_node(node_id) -> extra config entries for that node's messages (e.g. its token); combine: what merges the
        replies, when not the method's own combiner (Method.combiner: privacy.client_dp)."""
        self.cfg = cfg
        self.per_node = per_node
        self.method = METHODS[cfg.strategy]
        self.combine = combine or self.method.combine
        self.memory = ServerMemory()
        self.last_train: list[ClientOutcome] = []
        self.last_evaluate: list[ClientOutcome] = []
        self.last_diagnostics: dict | None = None  # federation.merge_diagnostics: the last merge's numbers
        self.node_partition: dict[int, int] = {}  # learned from the clients (query at start, then every reply)
        self._reference: Tensors | None = None
        self._sent: dict[int, Tensors] = {}  # node -> what it was sent, where that is not the global state

    def summary(self) -> None:
        log.info("strategy %s: fraction_train=%s fraction_evaluate=%s min_train_clients=%s fisher_floor=%g normalize=%s",
                 self.cfg.strategy, self.cfg.fraction_train, self.cfg.fraction_evaluate, self.cfg.min_train_clients,
                 self.cfg.fisher_floor, self.cfg.fisher_normalize)

    # --- state that must survive a restart ------------------------------------------
    def state_dict(self) -> Tensors:
        return self.memory.state_dict()

    def load_state_dict(self, state: Tensors) -> None:
        self.memory.load_state_dict(state)

    # --- messages ---------------------------------------------------------------------
    def _messages(self, arrays: ArrayRecord, config: ConfigRecord, nodes: list[int], kind: str) -> list[Message]:
        state = arrays.to_torch_state_dict()
        msgs = []
        for node in nodes:
            own = self.method.topology.state_for(self.node_partition.get(node), state, self.memory)
            if own is not state:
                self._sent[node] = own
            conf = ConfigRecord({**dict(config), **self.per_node(node)}) if self.per_node else config
            msgs.append(Message(content=RecordDict({keys.ARRAYS: arrays if own is state else ArrayRecord(own), keys.CONFIG: conf}),
                                message_type=kind, dst_node_id=node))
        return msgs

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._reference, self._sent = arrays.to_torch_state_dict(), {}
        config[keys.SERVER_ROUND] = server_round
        # privacy.client_dp: Poisson sampling from OS entropy, as its accountant assumes
        poisson = self.combine.sampler(self.cfg.seed, server_round) if isinstance(self.combine, (ClientDP, ClientDPFisher)) else None
        return self._messages(
            arrays, config, self.method.topology.sample(list(grid.get_node_ids()), server_round, self.cfg, poisson), MessageType.TRAIN
        )

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        config[keys.SERVER_ROUND] = server_round
        nodes = self.method.topology.evaluators(list(grid.get_node_ids()), server_round, self.cfg)
        return self._messages(arrays, config, nodes, MessageType.EVALUATE)

    # --- aggregation ------------------------------------------------------------------
    def _validate(self, out: ClientOutcome) -> None:
        """Gate one parsed training reply (sets out.rejected)."""
        if out.rejected or out.theta is None:
            return
        if out.partition_id is not None and out.partition_id >= 0:
            self.node_partition[out.node_id] = out.partition_id
        assert self._reference is not None
        reference = self.method.trains.shared(self._sent.get(out.node_id, self._reference))  # what a client uploads
        problems = validate_update(
            reference,
            out.theta,
            out.fisher if self._takes_fisher else None,
            out.metrics.get(keys.NUM_EXAMPLES, 0.0),
            self.cfg.max_update_norm,
        )
        if problems:
            out.rejected = "; ".join(problems)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        assert self._reference is not None, "configure_train must run first"
        self.last_diagnostics = None
        outcomes = parse_replies(replies, arrays=True, fisher=self._takes_fisher)
        for out in outcomes:
            self._validate(out)
            if out.rejected:
                log.warning(
                    "round %d: rejected update from node %d (partition %s): %s", server_round, out.node_id, out.partition_id, out.rejected
                )
        self.last_train = outcomes
        accepted = [o for o in outcomes if not o.rejected]
        private = isinstance(self.combine, (ClientDP, ClientDPFisher))
        if private and len(accepted) < self.method.topology.min_replies(self.cfg):
            log.warning("round %d: only %d valid updates (< min_train_clients=%d); under privacy.client_dp the round releases its "
                        "noised sum all the same (keeping the previous adapters would tell whoever sees them how many took part)",
                        server_round, len(accepted), self.method.topology.min_replies(self.cfg))
        elif len(accepted) < self.method.topology.min_replies(self.cfg):
            log.warning(
                "round %d: only %d valid updates (< min_train_clients=%d): keeping the previous global adapters",
                server_round,
                len(accepted),
                self.method.topology.min_replies(self.cfg),
            )
            return None, None
        counts = [o.metrics[keys.NUM_EXAMPLES] for o in accepted]
        total = sum(counts)
        loss = sum(c * o.metrics[keys.TRAIN_LOSS] for c, o in zip(counts, accepted, strict=True)) / total if accepted else 0.0
        updates = [
            Update(int(o.partition_id if o.partition_id is not None else -1), o.theta, o.fisher, c)  # type: ignore[arg-type]
            for o, c in zip(accepted, counts, strict=True)
        ]
        # client DP noises what clients upload only (FFA's frozen A stays as it is), whether or not any replied
        reference = self.method.trains.shared(self._reference) if private else self._reference
        merged = self.method.topology.combine(self.combine, reference, updates, self.cfg, self.memory)
        if merged is not None and self.cfg.merge_diagnostics:
            self.last_diagnostics = self._diagnose(accepted, counts, merged)
        merged = None if merged is None else self.method.complete(self._reference, merged)
        metrics = MetricRecord({keys.TRAIN_LOSS: loss, keys.NUM_EXAMPLES: total}) if accepted else None  # none: no client trained
        return (ArrayRecord(merged) if merged is not None else None), metrics

    @property
    def _takes_fisher(self) -> bool:
        """Replies carry a Fisher: the method merges with it, or federation.merge_diagnostics asked for one."""
        return self.method.sends_fisher or self.cfg.merge_diagnostics

    def _diagnose(self, accepted: list[ClientOutcome], counts: list[float], merged: Tensors) -> dict:
        """federation.merge_diagnostics: the round's merge in numbers (fednano.diagnostics), clients by partition."""
        assert self._reference is not None
        thetas = [o.theta for o in accepted if o.theta is not None]
        fishers = [o.fisher for o in accepted if o.fisher is not None]
        weights = merge_weights(fishers, counts, self.cfg.fisher_floor, self.cfg.fisher_normalize, self.cfg.fisher_power)
        out = merge_diagnostics(self.method.trains.shared(self._reference), thetas, fishers, weights, counts, merged)
        errors = [o.metrics.get(keys.FISHER_REL_ERROR) for o in accepted]
        out["clients"] = {str(o.partition_id): c | ({"fisher_rel_error": e} if e is not None else {})
                          for o, c, e in zip(accepted, out["clients"], errors, strict=True)}
        return out

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        outcomes = parse_replies(replies)
        for out in outcomes:
            if out.rejected:
                log.warning("round %d: evaluation failed on node %d: %s", server_round, out.node_id, out.rejected)
        self.last_evaluate = outcomes
        ok = [o for o in outcomes if not o.rejected]
        if not ok:
            return None
        n = sum(o.metrics[keys.NUM_EXAMPLES] for o in ok)
        return MetricRecord({keys.ACCURACY: sum(o.metrics[keys.ACCURACY] * o.metrics[keys.NUM_EXAMPLES] for o in ok) / n})
