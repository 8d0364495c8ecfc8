"""The ClientApp: a thin front for a node's work, light enough that a fresh process per message starts fast.

Under a SuperNode (Flower starts a `flwr-clientapp` process for every message) it hands each train and evaluate
message to the node's warm worker (node_worker.py), which keeps the NanoEdge, its image features and the split
channel between messages; elsewhere (the simulation's Ray actors, node config `warm-worker=0`) it does the work
in its own process. Either way the work is client_work.py's. This module imports neither torch nor the NanoEdge's
code: a relayed message never loads them in the ClientApp process.
"""

from __future__ import annotations

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fednano.errors import ConfigError
from fednano.federation import keys, node_worker
from fednano.federation.node_worker import Node

app = ClientApp()


def _reply(kind: str, msg: Message, context: Context) -> Message:
    node = Node.of(context)
    if node_worker.wanted(node):
        content = node_worker.relay(kind, msg.content, node)
    else:
        from fednano.federation import client_work  # (here: a process that relays never imports it)

        content = client_work.HANDLERS[kind](msg.content, node)
    return Message(content=content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the method's client part from the global state; reply with the update, its Fisher, metrics and bytes."""
    return _reply("train", msg, context)


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    """Accuracy of the state it was sent (as the method answers with it) on this client's local test split."""
    return _reply("evaluate", msg, context)


@app.query()
def identify(msg: Message, context: Context) -> Message:
    """Which data partition this node holds, and of how many (the server asks once: to address clients that keep
    their own state, and to refuse nodes that claim one partition or another federation size)."""
    nc = context.node_config
    if keys.PARTITION_ID not in nc:
        raise ConfigError(f"node {context.node_id}: its node config has no partition-id")
    ident: dict = {k: int(keys.number(nc[k])) for k in (keys.PARTITION_ID, keys.NUM_PARTITIONS) if k in nc}
    return Message(content=RecordDict({keys.METRICS: MetricRecord(ident)}), reply_to=msg)
