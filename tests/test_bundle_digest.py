"""One NanoEdge, built once where the LLM is: the client bundle's content digest, shipping it to nodes (a packed file,
or the split channel's `bundle` op), and a digest mismatch caught on every path (unpack, message, export, generate).
Also the nodes' identity: one partition-id per node, num-partitions = data.num_clients, no packaged data in place of
a node's own."""

import dataclasses
import io
import json
import tarfile

import pytest
from safetensors.torch import save_file
from typer.testing import CliRunner

from fednano.backbones.bundle import BundleError
from fednano.backbones.digest import MANIFEST, NODE_BUNDLES, digest, digest_of, held, manifest, pack, short, unpack, verify
from fednano.cli import app
from fednano.config import ConfigError
from fednano.split.client import SplitChannelError, SplitClient
from fednano.split.frames import Frame
from fednano.split.server import SplitServer

OTHER = "0" * 64  # a digest no bundle has


def test_the_digest_is_the_sha256_of_the_canonical_manifest_of_every_file(tiny_bundle):
    client = tiny_bundle / "client"
    man = manifest(client)
    paths = [f["path"] for f in man["files"]]
    assert paths == sorted(paths) and MANIFEST not in paths
    assert {"embeddings.safetensors", "connector.safetensors", "nanoedge.json"} <= set(paths)
    assert any(p.startswith("tokenizer/") for p in paths)
    assert all(f["size"] == (client / f["path"]).stat().st_size for f in man["files"])
    assert digest(client) == digest_of(man) == verify(client) == json.loads((tiny_bundle / "prepare.json").read_text())["client_digest"]


def test_pack_and_unpack_give_the_same_bundle_in_a_cache_holding_nothing_else(tiny_bundle, tmp_path):
    d = pack(tiny_bundle / "client", tmp_path / "a.tar")
    assert d == digest(tiny_bundle / "client")
    pack(tiny_bundle / "client", tmp_path / "b.tar")
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()  # no times, no owners: the same bytes
    node = tmp_path / "node-cache"
    got, folder = unpack(tmp_path / "a.tar", node, expected=d)
    assert got == d and folder == node / NODE_BUNDLES / d and verify(folder, d) == d
    assert held([node]) == {d: folder}
    assert [p.name for p in node.iterdir()] == [NODE_BUNDLES] and [p.name for p in (node / NODE_BUNDLES).iterdir()] == [d]
    assert unpack(tmp_path / "a.tar", node)[1] == folder  # again: held already


def _tampered(src, dst, name="connector.safetensors"):
    """`src` with one byte of `name` changed (its manifest left as it was)."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for m in tin.getmembers():
            data = tin.extractfile(m).read()
            if m.name == name:
                data = data[:-1] + bytes([data[-1] ^ 1])
            tout.addfile(m, io.BytesIO(data))


def test_unpack_refuses_a_corrupt_file_and_another_digest_in_one_line(tiny_bundle, tmp_path):
    d = pack(tiny_bundle / "client", tmp_path / "a.tar")
    _tampered(tmp_path / "a.tar", tmp_path / "bad.tar")
    with pytest.raises(BundleError, match="connector.safetensors does not match its manifest"):
        unpack(tmp_path / "bad.tar", tmp_path / "node")
    assert not list((tmp_path / "node" / NODE_BUNDLES).iterdir())  # nothing half-unpacked is left
    with pytest.raises(BundleError, match=f"holds NanoEdge bundle {short(d)}, not the run's {short(OTHER)}"):
        unpack(tmp_path / "a.tar", tmp_path / "node", expected=OTHER)
    res = CliRunner().invoke(app, ["bundle", "unpack", str(tmp_path / "a.tar"), "--cache-dir", str(tmp_path / "node"), "--digest", OTHER])
    assert res.exit_code == 2 and short(d) in res.output and short(OTHER) in res.output and len(res.output.strip().splitlines()) == 1
    res = CliRunner().invoke(app, ["bundle", "unpack", str(tmp_path / "bad.tar"), "--cache-dir", str(tmp_path / "node")])
    assert res.exit_code == 2 and "does not match its manifest" in res.output
    res = CliRunner().invoke(app, ["bundle", "unpack", str(tmp_path / "a.tar"), "--cache-dir", str(tmp_path / "node"), "--digest", d])
    assert res.exit_code == 0 and f"sha256:{d} verified" in res.output


def test_bundle_pack_command_prints_the_digest(tiny_bundle, tiny_cache, tmp_path):
    from tests.conftest import TINY

    res = CliRunner().invoke(app, ["bundle", "pack", str(tmp_path / "n.tar"), "--config", str(TINY), "--set",
                                   f'model.cache_dir="{tiny_cache}"'])
    assert res.exit_code == 0, res.output
    assert f"sha256:{digest(tiny_bundle / 'client')}" in res.output and (tmp_path / "n.tar").exists()


def test_a_node_fetches_the_bundle_over_the_split_channel_in_frames_and_verifies_it(tiny_bundle, tiny_llm, tiny_cfg, tmp_path, monkeypatch):
    from fednano.config import SplitConfig
    from fednano.runtime.bundle import client_bundle

    monkeypatch.setenv("FEDNANO_CACHE", str(tmp_path / "env-cache"))  # (a node also looks there: this machine's may hold the bundle)

    d = digest(tiny_bundle / "client")
    node_cfg = dataclasses.replace(tiny_cfg, model=dataclasses.replace(tiny_cfg.model, cache_dir=str(tmp_path / "node")))
    small = SplitConfig(max_frame_mb=0.07)  # chunks of 0.07 MiB - 64 KiB (header room) = 8 KiB: the tiny bundle (40 KB) takes several
    with SplitServer(tiny_llm, small, bundle=tiny_bundle / "client") as server, SplitClient(server.address, max_frame_mb=0.07) as client:
        folder = client_bundle(node_cfg, d, client)
        assert client.calls["bundle"] >= 4
        with pytest.raises(SplitChannelError, match=f"the server holds NanoEdge bundle {short(d)}"):
            client.request(Frame("bundle", meta={"digest": OTHER, "offset": 0}))
    assert folder == tmp_path / "node" / NODE_BUNDLES / d and verify(folder, d) == d
    assert client_bundle(node_cfg, d) == folder  # held now: no channel needed


def _node_job(cfg, digest_sent, node_config, monkeypatch, tmp_path):
    from flwr.app import Context, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fednano.federation import client_work
    from fednano.federation.node_worker import Node
    from tests.test_client_app import _close_runtimes, _message

    for attr in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)
    monkeypatch.setenv("FEDNANO_CACHE", str(tmp_path / "env-cache"))
    try:
        return client_work._job(_message(cfg, digest_sent).content, Node.of(Context(0, 21, node_config, RecordDict(), {})))[1]
    finally:
        _close_runtimes()


def test_a_message_naming_another_bundle_fails_naming_both_digests(tiny_bundle, tiny_cfg, tmp_path, monkeypatch):
    d = digest(tiny_bundle / "client")
    node = tmp_path / "node"
    pack(tiny_bundle / "client", tmp_path / "n.tar")
    unpack(tmp_path / "n.tar", node)
    base = {"partition-id": 0, "cache-dir": str(node), "fetch-bundle": 0}
    job = _node_job(tiny_cfg, d, base, monkeypatch, tmp_path)  # the run's own bundle: it trains from it
    assert job.rt.edge.num_visual_tokens > 0
    with pytest.raises(BundleError, match=rf"node 21: the node holds NanoEdge bundle {short(d)}, not the run's {short(OTHER)}"):
        _node_job(tiny_cfg, OTHER, base, monkeypatch, tmp_path)
    with pytest.raises(BundleError, match=r"node 21: the node holds no NanoEdge bundle .*fednano bundle pack .*fednano bundle unpack"):
        _node_job(tiny_cfg, d, {**base, "cache-dir": str(tmp_path / "empty")}, monkeypatch, tmp_path)


def test_a_node_refuses_a_held_bundle_whose_file_changed_on_its_disk(tiny_bundle, tiny_cfg, tmp_path, monkeypatch):
    d = digest(tiny_bundle / "client")
    node = tmp_path / "node"
    pack(tiny_bundle / "client", tmp_path / "n.tar")
    unpack(tmp_path / "n.tar", node)
    connector = node / NODE_BUNDLES / d / "connector.safetensors"
    data = bytearray(connector.read_bytes())
    data[-1] ^= 0xFF  # one flipped byte in a weight: same size, same folder name, same manifest
    connector.write_bytes(bytes(data))
    base = {"partition-id": 0, "cache-dir": str(node), "fetch-bundle": 0}
    with pytest.raises(BundleError, match=rf"node 21: the node's NanoEdge bundle {short(d)} .*: connector.safetensors does not match "
                                          r"its manifest \(size or sha256 differs\): the bundle is corrupt"):
        _node_job(tiny_cfg, d, base, monkeypatch, tmp_path)


def test_nodes_identity_is_checked_against_the_run(tiny_bundle, tiny_cfg, tmp_path, monkeypatch):
    from fednano.data.samples import DataError

    with pytest.raises(ConfigError, match=r"node 21: node config num-partitions=3, but the run has data.num_clients=2"):
        _node_job(tiny_cfg, None, {"partition-id": 0, "num-partitions": 3}, monkeypatch, tmp_path)
    with pytest.raises(ConfigError, match=r"node 21: node config partition-id=2 is not one of 0..1"):
        _node_job(tiny_cfg, None, {"partition-id": 2}, monkeypatch, tmp_path)
    with pytest.raises(ConfigError, match=r"node 21: its node config has no partition-id"):
        _node_job(tiny_cfg, None, {}, monkeypatch, tmp_path)
    on_nodes = dataclasses.replace(tiny_cfg, data=dataclasses.replace(tiny_cfg.data, on_nodes=True))  # easy-vqa: packaged
    with pytest.raises(DataError, match="node 21: data.on_nodes is set, but its node config names no data-path"):
        _node_job(on_nodes, None, {"partition-id": 0}, monkeypatch, tmp_path)


class _Reply:
    """What identify_partitions reads of a reply."""

    def __init__(self, node, **metrics):
        from flwr.app import MetricRecord, RecordDict

        self.metadata = type("M", (), {"src_node_id": node})()
        self.content = RecordDict({"metrics": MetricRecord(metrics)})

    def has_error(self):
        return False


class _Grid:
    def __init__(self, replies):
        self.replies = replies

    def get_node_ids(self):
        return [r.metadata.src_node_id for r in self.replies]

    def send_and_receive(self, msgs, timeout):
        return self.replies


def test_two_nodes_claiming_one_partition_are_refused_both_named(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    from fednano.federation.server_app import identify_partitions

    for attr in ("_task_id", "_run_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)
    ok = [_Reply(11, **{"partition-id": 0, "num-partitions": 2}), _Reply(12, **{"partition-id": 1})]
    assert identify_partitions(_Grid(ok), 5, 2) == {11: 0, 12: 1}
    with pytest.raises(ConfigError, match=r"nodes 11 and 12 both claim partition-id=0"):
        identify_partitions(_Grid([_Reply(12, **{"partition-id": 0}), _Reply(11, **{"partition-id": 0})]), 5, 2)
    with pytest.raises(ConfigError, match=r"node 12: node config num-partitions=5, but the run has data.num_clients=2"):
        identify_partitions(_Grid([_Reply(11, **{"partition-id": 0}), _Reply(12, **{"partition-id": 1, "num-partitions": 5})]), 5, 2)


def _run_dir(tmp_path, cfg, edge, bundle_digest):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(cfg.to_toml())
    save_file(edge.adapter_state(), run / "adapters.safetensors")
    (run / "results.json").write_text(json.dumps({"bundle_digest": bundle_digest, "rounds": [], "final": {}}))
    return run


def test_export_and_generate_refuse_a_bundle_other_than_the_runs(tiny_cfg, tiny_bundle, tiny_edge, tmp_path):
    from fednano.export import ExportError, export_run
    from fednano.generate import load_tuned

    d = digest(tiny_bundle / "client")
    run = _run_dir(tmp_path, tiny_cfg, tiny_edge.edge, OTHER)
    needle = rf"the run trained with NanoEdge bundle {short(OTHER)}, but the prepared .* holds {short(d)}"
    with pytest.raises(ExportError, match=needle):
        export_run(run, tmp_path / "out")
    with pytest.raises(ExportError, match=needle):
        load_tuned(run, "cpu")
    for command in (["export", str(run), "--output", str(tmp_path / "out")], ["generate", str(run), "--prompt", "hi"]):
        res = CliRunner().invoke(app, command)
        assert res.exit_code == 2 and short(OTHER) in res.output and short(d) in res.output, res.output
        assert len(res.output.strip().splitlines()) == 1
    (run / "results.json").write_text(json.dumps({"bundle_digest": d}))  # the run's own bundle: exported
    assert (export_run(run, tmp_path / "out") / "vision" / "connector.safetensors").exists()
    assert not (tmp_path / "out" / "vision" / MANIFEST).exists()  # folded weights: not the bundle any more
