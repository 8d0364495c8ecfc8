import dataclasses

import pytest
from typer.testing import CliRunner

from fednano.cli import app
from fednano.config import ConfigError, RunConfig, dump_toml, from_dict, load_config
from tests.conftest import ROOT, TINY


def _write(tmp_path, text):
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[model]\nbackbonez = 'smol'\n", "unknown field model.backbonez"),
        ("[modle]\n", r"unknown section \[modle\]"),
        ("[train]\nlocal_steps = 'ten'\n", "train.local_steps must be int"),
        ("[train]\nlocal_steps = 0\n", "train.local_steps: must be >= 1"),
        ("[federation]\nstrategy = 'fedadgrad'\n", "unknown strategy 'fedadgrad'"),
        ("[data]\ndirichlet_alpha = -1\n", "data.dirichlet_alpha: must be > 0"),
        ("[federation]\neval_every = 0\n", "federation.eval_every: must be >= 1"),
        ("[privacy]\naudit_samples = 0\n", "privacy.audit_samples: must be >= 1"),
        ("[privacy]\naudit = true\n[data]\non_nodes = true\n", "privacy.audit: the audit attacks the clients' own training samples"),
        ("[data]\nvalidation_samples = -5\n", "data.validation_samples: must be >= 0"),
        ("[data]\non_nodes = true\nserver_test = false\nvalidation_samples = 10\n", "data.validation_samples: the server scores"),
        ("[model\n", "not valid TOML"),
    ],
)
def test_bad_configs_name_file_and_field(tmp_path, text, needle):
    p = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=needle) as err:
        load_config(p)
    assert str(p) in str(err.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "none.toml")


def test_config_round_trips_through_toml(tmp_path):
    cfg = load_config(ROOT / "configs" / "tiny.toml")
    again = load_config(_write(tmp_path, cfg.to_toml()))
    assert again == cfg


def test_default_config_file_is_the_documented_defaults():
    # configs/default.toml is generated from the dataclasses: it cannot drift.
    assert (ROOT / "configs" / "default.toml").read_text().strip() == dump_toml(RunConfig().to_dict(), with_help=True).strip()
    assert load_config(ROOT / "configs" / "default.toml") == RunConfig()


def test_cli_reports_bad_config_without_traceback(tmp_path):
    p = _write(tmp_path, "[train]\nlr = 'fast'\n")
    res = CliRunner().invoke(app, ["prepare", "--config", str(p)])
    assert res.exit_code == 2
    assert "train.lr must be float" in res.output and str(p) in res.output


def test_cli_set_overrides_and_help():
    res = CliRunner().invoke(app, ["run", "--help"])
    assert res.exit_code == 0 and "--config" in res.output and "--set" in res.output and "--output" in res.output
    assert "train.local_steps" in res.output and "federation.fisher_floor" in res.output  # every option explained
    res = CliRunner().invoke(app, ["options"])
    assert "federation.strategy" in res.output and "Fisher merging" in res.output
    res = CliRunner().invoke(app, ["run", "--set", "federation.rounds=zero"])
    assert res.exit_code == 2 and "federation.rounds must be int" in res.output


def test_every_shipped_config_is_valid():
    files = sorted((ROOT / "configs").glob("*.toml"))
    assert {f.name for f in files} >= {"default.toml", "tiny.toml", "scienceqa.toml", "iconqa.toml", "llava-json.toml"}
    for f in files:
        load_config(f)


def test_every_shipped_sweep_is_valid():
    from fednano.experiments.sweep import load_sweep

    files = sorted((ROOT / "configs" / "sweeps").rglob("*.toml"))
    assert {f.name for f in files} >= {"example.toml", "bench.toml"}
    for f in files:
        assert load_sweep(f).points  # every grid point's run config validates


def test_a_run_recorded_before_a_field_existed_is_the_same_config():
    from fednano.config import RunConfig, same_config

    cfg = RunConfig()
    old = cfg.to_dict()
    del old["federation"]["server_lr"]  # a field added later, at its default
    assert same_config(old, cfg)
    old["federation"]["rounds"] = cfg.federation.rounds + 1
    assert not same_config(old, cfg)
    assert not same_config({"nonsense": {}}, cfg)
    changed = RunConfig()
    changed.federation.server_lr = 0.5
    assert not same_config(
        cfg.to_dict() | {"federation": {k: v for k, v in cfg.to_dict()["federation"].items() if k != "server_lr"}}, changed
    )


@pytest.mark.parametrize(
    ("sets", "needle"),
    [
        (["data.dataset='llava-json'", "data.path='{tmp}/nowhere.json'"], "data.path='{tmp}/nowhere.json': data file not found"),
        (["data.dataset='llava-json'", "data.path='{tmp}/bad.json'"], "{tmp}/bad.json: not valid JSON"),
        (["data.dataset='scienceqa'", "data.path='{tmp}/sqa'"], "ScienceQA directory not found: {tmp}/sqa"),
        (["model.backbone='llava'", "model.checkpoint='{tmp}/llava'"], "model.checkpoint: checkpoint directory not found: {tmp}/llava"),
        (["model.backbone='compose'", "model.llm_path='{tmp}/lm'"], "model.llm_path: checkpoint directory not found: {tmp}/lm"),
        (["privacy.audit=true", "federation.strategy='fedit-lora'"], "privacy.audit: 'fedit-lora' has no global NanoEdge adapters"),
        (["privacy.audit=true", "federation.strategy='local'"], "privacy.audit: 'local' has no global NanoEdge adapters"),
    ],
)
def test_run_refuses_bad_data_and_sources_in_one_line_before_anything_starts(tmp_path, sets, needle):
    """Bad data or a missing checkpoint is found before the backbone is prepared or a server started:
    one line naming the field and file, exit code 2, no run folder, nothing prepared."""
    (tmp_path / "bad.json").write_text("[{not json")
    cache, out = tmp_path / "cache", tmp_path / "run"
    args = ["run", "--config", str(ROOT / "configs" / "tiny.toml"), "--output", str(out), "--set", f"model.cache_dir='{cache}'"]
    for s in sets:
        args += ["--set", s.format(tmp=tmp_path)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    assert needle.format(tmp=tmp_path) in res.output and res.output.startswith("error: ")
    assert len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output
    assert not out.exists() and not any(cache.glob("*"))


def test_debug_shows_the_traceback_of_a_one_line_error(tmp_path):
    from fednano.data.samples import DataError

    res = CliRunner().invoke(app, ["--debug", "run", "--config", str(ROOT / "configs" / "tiny.toml"), "--output", str(tmp_path / "run"),
                                   "--set", "data.dataset='llava-json'", "--set", f"data.path='{tmp_path}/none.json'"])
    assert isinstance(res.exception, DataError) and "data file not found" in str(res.exception)


def test_a_node_sets_its_own_batch_size_device_and_threads():
    from fednano.config import with_node_settings

    cfg = load_config(TINY)
    mine = with_node_settings(cfg, {"partition-id": 1, "state-dir": "/srv/a", "batch-size": 2, "eval-batch-size": 5,
                                    "device": "cpu", "threads": 3, "image-folder": "/srv/a/images"}, "node 7")
    assert (mine.train.batch_size, mine.train.eval_batch_size, mine.model.client_device, mine.federation.client_cpus) == (2, 5, "cpu", 3.0)
    assert mine.data.image_folder == "/srv/a/images"
    assert mine.train.local_steps == cfg.train.local_steps and mine.federation == dataclasses.replace(cfg.federation, client_cpus=3.0)
    assert with_node_settings(cfg, {"partition-id": 0}) is cfg  # nothing of its own: the server's config


@pytest.mark.parametrize(("node_config", "needle"), [
    ({"batch-size": 0}, "node 7: node config: .*train.batch_size: must be >= 1"),
    ({"batch-size": 2.5}, "node 7: node config batch-size=2.5 must be an integer"),
    ({"batch-size": "big"}, "node 7: node config batch-size='big' must be an integer"),
    ({"device": 3}, "node 7: node config device=3 must be a string"),
    ({"device": "tpu"}, "node 7: node config: .*client_device"),
])
def test_a_bad_node_setting_names_the_node_and_the_key(node_config, needle):
    from fednano.config import with_node_settings

    with pytest.raises(ConfigError, match=needle):
        with_node_settings(load_config(TINY), node_config, "node 7")


def test_nodes_with_their_own_data_cannot_run_centralized_and_name_their_data():
    from fednano.config import with_node_settings

    with pytest.raises(ConfigError, match="data.on_nodes: 'centralized' trains on every client's data on the server"):
        from_dict({"data": {"on_nodes": True}, "federation": {"strategy": "centralized"}})
    cfg = from_dict({"data": {"on_nodes": True}})
    own = {"dataset": "llava-json", "data-path": "/srv/a/data.json", "test-path": "/srv/a/held-out.json"}
    mine = with_node_settings(cfg, own, "node 3")
    assert (mine.data.dataset, mine.data.path, mine.data.test_path) == ("llava-json", "/srv/a/data.json", "/srv/a/held-out.json")
    with pytest.raises(ConfigError, match="node 3: node config: .*data.dataset: unknown dataset 'coco'"):
        with_node_settings(cfg, {"dataset": "coco", "data-path": "/srv/a"}, "node 3")
    # a server without data of its own scores with the clients' test splits, which only nodes with their own data have
    with pytest.raises(ConfigError, match="data.server_test: false means the server holds no data .* needs data.on_nodes"):
        from_dict({"data": {"server_test": False}})
    assert not from_dict({"data": {"on_nodes": True, "server_test": False}}).data.server_test
