"""FedNanoStrategy: Flower's Strategy interface around the pure merge functions.

A strategy only aggregates (Flower's rule): it samples clients with an explicit
seeded RNG, builds the messages, gates each reply through `validate_update`,
and merges with the registered method (Fisher merging or FedAvg), optionally
followed by a server optimiser step (FedAdam / FedYogi). Per-client outcomes of
the last round are kept in `last_train` / `last_evaluate`.

Topologies: "federated" sends everyone the global adapters; "local" sends each
client its own adapters and merges nothing; "centralized" trains one client
(that holds all data). Everything the strategy must remember across rounds (the
server optimiser's moments, local clients' adapters) is in `state_dict()`, which
the server checkpoints with every round.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fednano.aggregation import STRATEGIES, server_opt_step, validate_update
from fednano.config import FederationConfig
from fednano.federation import keys

log = logging.getLogger(__name__)


@dataclass
class ClientOutcome:
    node_id: int
    partition_id: int | None
    metrics: dict[str, float] = field(default_factory=dict)
    rejected: str | None = None
    info: dict[str, str] = field(default_factory=dict)  # where the client computed (device, name)


class FedNanoStrategy(Strategy):
    def __init__(self, cfg: FederationConfig, per_node: Callable[[int], dict] | None = None) -> None:
        """per_node(node_id) -> extra config entries for that node's messages (e.g. its token)."""
        self.cfg = cfg
        self.per_node = per_node
        self.method = STRATEGIES[cfg.strategy]
        self.want_fisher, self._merge = self.method.wants_fisher, self.method.merge
        self.last_train: list[ClientOutcome] = []
        self.last_evaluate: list[ClientOutcome] = []
        self.node_partition: dict[int, int] = {}  # learned from the clients (query at start, then every reply)
        self.client_states: dict[int, dict[str, torch.Tensor]] = {}  # "local": partition -> its own adapters
        self.opt_state: dict[str, torch.Tensor] = {}  # fedadam / fedyogi moments and step count
        self._reference: dict[str, torch.Tensor] | None = None
        self._sent: dict[int, dict[str, torch.Tensor]] = {}  # node -> the adapters it was sent this round

    def summary(self) -> None:
        log.info("strategy %s: fraction_train=%s min_train_clients=%s fisher_floor=%g normalize=%s",
                 self.cfg.strategy, self.cfg.fraction_train, self.cfg.min_train_clients, self.cfg.fisher_floor, self.cfg.fisher_normalize)

    # --- state that must survive a restart ------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {f"opt.{k}": v for k, v in self.opt_state.items()}
        for pid, st in self.client_states.items():
            out.update({f"client.{pid}.{k}": v for k, v in st.items()})
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.opt_state = {k[4:]: v for k, v in state.items() if k.startswith("opt.")}
        self.client_states = {}
        for k, v in state.items():
            if k.startswith("client."):
                _, pid, name = k.split(".", 2)
                self.client_states.setdefault(int(pid), {})[name] = v

    def min_replies(self) -> int:
        return 1 if self.method.topology in ("local", "centralized") else self.cfg.min_train_clients

    # --- sampling and messages ------------------------------------------------------
    def _sample(self, grid: Grid, server_round: int, fraction: float) -> list[int]:
        nodes = sorted(grid.get_node_ids())
        if self.method.topology == "centralized":  # one trainer; it reads every partition
            return nodes[:1]
        k = max(1, min(len(nodes), round(len(nodes) * fraction)))
        return sorted(random.Random(f"{self.cfg.seed}-{server_round}").sample(nodes, k))

    def arrays_for(self, node: int, arrays: ArrayRecord) -> ArrayRecord:
        """What a node is sent: the global adapters, or ("local") its own."""
        if self.method.topology == "local":
            own = self.client_states.get(self.node_partition.get(node, -1))
            if own is not None:
                return ArrayRecord(own)
        return arrays

    def _messages(self, arrays: ArrayRecord, config: ConfigRecord, nodes: list[int], kind: str) -> list[Message]:
        def content(node: int) -> RecordDict:
            conf = ConfigRecord({**dict(config), **self.per_node(node)}) if self.per_node else config
            return RecordDict({keys.ARRAYS: self.arrays_for(node, arrays), keys.CONFIG: conf})

        return [Message(content=content(n), message_type=kind, dst_node_id=n) for n in nodes]

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._reference = arrays.to_torch_state_dict()
        config[keys.SERVER_ROUND] = server_round
        config[keys.WANT_FISHER] = self.method.fisher
        config[keys.PROXIMAL_MU] = self.cfg.proximal_mu if self.method.proximal else 0.0
        msgs = self._messages(arrays, config, self._sample(grid, server_round, self.cfg.fraction_train), MessageType.TRAIN)
        # "local" clients start from their own adapters: their updates are checked against those
        self._sent = {m.metadata.dst_node_id: m.content[keys.ARRAYS].to_torch_state_dict() for m in msgs} if self.method.topology == "local" else {}
        return msgs

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        config[keys.SERVER_ROUND] = server_round
        return self._messages(arrays, config, sorted(grid.get_node_ids()), MessageType.EVALUATE)

    # --- aggregation ------------------------------------------------------------------
    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        assert self._reference is not None, "configure_train must run first"
        outcomes, accepted, thetas, fishers, counts = [], [], [], [], []
        for msg in replies:
            out = ClientOutcome(msg.metadata.src_node_id, None)
            outcomes.append(out)
            if msg.has_error():
                out.rejected = f"client error: {msg.error.reason}"
                continue
            try:
                metrics = dict(msg.content[keys.METRICS])
                out.partition_id = int(metrics.get(keys.PARTITION_ID, -1))
                out.metrics = {k: float(v) for k, v in metrics.items()}
                out.info = {k: str(v) for k, v in dict(msg.content.get(keys.CLIENT_INFO, {})).items()}
                theta = msg.content[keys.ARRAYS].to_torch_state_dict()
                fisher = msg.content[keys.FISHER].to_torch_state_dict() if self.want_fisher else None
            except (KeyError, TypeError, ValueError) as e:
                out.rejected = f"malformed reply: {type(e).__name__}: {e}"
                continue
            if out.partition_id is not None and out.partition_id >= 0:
                self.node_partition[out.node_id] = out.partition_id
            reference = self._sent.get(out.node_id, self._reference)
            problems = validate_update(reference, theta, fisher, out.metrics.get(keys.NUM_EXAMPLES, 0.0), self.cfg.max_update_norm)
            if problems:
                out.rejected = "; ".join(problems)
                continue
            accepted.append(out)
            thetas.append(theta)
            fishers.append(fisher)
            counts.append(out.metrics[keys.NUM_EXAMPLES])
        for out in outcomes:
            if out.rejected:
                log.warning("round %d: rejected update from node %d (partition %s): %s", server_round, out.node_id, out.partition_id, out.rejected)
        self.last_train = outcomes
        if len(thetas) < self.min_replies():
            log.warning("round %d: only %d valid updates (< min_train_clients=%d): keeping the previous global adapters",
                        server_round, len(thetas), self.min_replies())
            return None, None
        total = sum(counts)
        loss = sum(c * o.metrics[keys.TRAIN_LOSS] for c, o in zip(counts, accepted, strict=True)) / total
        metrics = MetricRecord({keys.TRAIN_LOSS: loss, keys.NUM_EXAMPLES: total})
        if self.method.topology == "local":  # nothing is merged: each client keeps what it trained
            for out, theta in zip(accepted, thetas, strict=True):
                self.client_states[int(out.partition_id)] = theta
            return None, metrics
        merged = self._merge(thetas, fishers, counts, floor=self.cfg.fisher_floor, normalize=self.cfg.fisher_normalize)
        if self.method.server_opt:
            c = self.cfg
            merged, self.opt_state = server_opt_step(self.method.server_opt, self._reference, merged, self.opt_state,
                                                     lr=c.server_lr, beta1=c.server_beta1, beta2=c.server_beta2, tau=c.server_tau)
        return ArrayRecord(merged), metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        outcomes = []
        for msg in replies:
            out = ClientOutcome(msg.metadata.src_node_id, None)
            if msg.has_error():
                out.rejected = f"client error: {msg.error.reason}"
                log.warning("round %d: evaluation failed on node %d: %s", server_round, out.node_id, msg.error.reason)
            else:
                out.metrics = {k: float(v) for k, v in dict(msg.content[keys.METRICS]).items()}
                out.partition_id = int(out.metrics.get(keys.PARTITION_ID, -1))
            outcomes.append(out)
        self.last_evaluate = outcomes
        ok = [o for o in outcomes if not o.rejected]
        if not ok:
            return None
        n = sum(o.metrics[keys.NUM_EXAMPLES] for o in ok)
        return MetricRecord({keys.ACCURACY: sum(o.metrics[keys.ACCURACY] * o.metrics[keys.NUM_EXAMPLES] for o in ok) / n})
