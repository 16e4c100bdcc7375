"""The ServerApp and ClientApp: thin wrappers that carry tunelab.federated's messages (named
arrays + scalars) as Flower records and call the framework-free round logic. Flower imports this
module in the processes it starts (`flwr-serverapp`, `flwr-clientapp`); the run config path comes
in the Flower run config (`config`), a client's partition in its node config (`partition-id`,
`num-partitions`)."""
from __future__ import annotations

import json
import time
import traceback
from pathlib import Path

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from tunelab import config as C

server_app = ServerApp()
client_app = ClientApp()


def to_records(message) -> RecordDict:
    arrays, scalars = message
    return RecordDict({"arrays": ArrayRecord(array_dict={k: Array(v) for k, v in arrays.items()}),
                       "config": ConfigRecord(dict(scalars))})


def from_records(content: RecordDict):
    return {k: v.numpy() for k, v in content["arrays"].items()}, dict(content["config"])


class GridTransport:
    """tunelab.federated.server.Transport over a Flower Grid."""

    def __init__(self, grid: Grid):
        self.grid = grid

    def nodes(self, at_least: int, timeout: float) -> list[int]:
        t0 = time.monotonic()  # nodes may still be registering when the run starts
        while len(found := sorted(self.grid.get_node_ids())) < at_least and time.monotonic() - t0 < timeout:
            time.sleep(0.5)
        return found

    def encoded_bytes(self, message) -> int:
        """The message's content as Flower stores and sends it: the deflated objects of its
        RecordDict (object headers, .npy headers, config JSON, array chunks; identical chunks once)."""
        from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
        return sum(len(o.deflate()) for o in get_all_nested_objects(to_records(message)).values())

    def send(self, messages: dict, timeout: float) -> dict:
        out = [Message(to_records(m), dst_node_id=n, message_type=MessageType.TRAIN) for n, m in messages.items()]
        replies = self.grid.send_and_receive(out, timeout=timeout)
        return {r.metadata.src_node_id: from_records(r.content) for r in replies if not r.has_error()}


@server_app.main()
def serve(grid: Grid, context: Context) -> None:
    from tunelab.federated.run import serve_rounds
    cfg = C.load(context.run_config["config"])
    status = Path(cfg.output) / "federated" / "status.json"
    try:
        serve_rounds(cfg, GridTransport(grid))
        status.write_text(json.dumps({"state": "finished"}))
    except BaseException as e:
        status.write_text(json.dumps({"state": "failed", "error": f"{type(e).__name__}: {e}",
                                      "traceback": traceback.format_exc()}))
        raise


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    from tunelab.federated.client import client_round
    cfg = C.load(context.run_config["config"])
    part, parts = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    return Message(to_records(client_round(cfg, part, parts, from_records(msg.content))), reply_to=msg)
