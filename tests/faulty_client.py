"""A ClientApp that makes one client die or hang mid-round, then does FedNano's own work.

FEDNANO_TEST_FAULT="exit:<partition>:<round>" or "hang:<partition>:<round>" picks the client
and the round. It lives here, with the tests, so the ClientApp that users run carries no hook.
"""

from __future__ import annotations

import os
import time

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fednano.federation import client_app as fednano_client
from fednano.federation import keys

app = ClientApp()


def _fault(partition: int, rnd: int) -> None:
    spec = os.environ.get("FEDNANO_TEST_FAULT", "")
    if not spec:
        return
    kind, part, when = spec.split(":")
    if int(part) == partition and int(when) == rnd:
        if kind == "exit":
            os._exit(17)
        time.sleep(10**6)


@app.train()
def train(msg: Message, context: Context) -> Message:
    _fault(int(context.node_config[keys.PARTITION_ID]), int(msg.content[keys.CONFIG][keys.SERVER_ROUND]))
    return fednano_client.train(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return fednano_client.evaluate_global(msg, context)


@app.query()
def identify(msg: Message, context: Context) -> Message:
    return fednano_client.identify(msg, context)
