"""Config schema: valid configs load, bad ones exit 2 naming every bad field, before any model loads."""

import json

import pytest

from tasks.config import ConfigError, load_config


@pytest.mark.parametrize("path", ["configs/tiny.yaml", "configs/demo.yaml"])
def test_shipped_configs_are_valid(cli, path):
    res = cli("validate", path)
    assert res.returncode == 0, res.stderr
    assert "valid" in res.stdout


@pytest.mark.parametrize("path", ["configs/tiny.yaml", "configs/demo.yaml"])
def test_a_dumped_config_loads_again(tmp_path, path):
    """MLflow keeps each run's resolved config as config.yaml; rerunning from it must work."""
    import yaml

    cfg = load_config(path)
    dumped = tmp_path / "config.yaml"
    dumped.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert load_config(dumped) == cfg


def test_overrides_are_typed_and_nested():
    cfg = load_config(
        "configs/tiny.yaml", ["train.lora.r=4", "train.learning_rate=1e-5", "data.packing=false"]
    )
    assert cfg.train.lora.r == 4 and cfg.train.learning_rate == 1e-5 and cfg.data.packing is False


def test_defaults_derive_mlflow_uri_and_names():
    cfg = load_config("configs/tiny.yaml", ["output_dir=/tmp/x"])
    assert cfg.mlflow_uri == "sqlite:////tmp/x/mlflow.db"
    assert cfg.registered_model == "tiny" and cfg.served_model_name == "tiny"


BAD = {
    "typo": ("train:\n  methd: lora\n", "train.methd: unknown key (did you mean 'train.method'?)"),
    "top_typo": ("trian: {}\n", "trian: unknown key (did you mean 'train'?)"),
    "negative_lr": ("train: {learning_rate: -1}\n", "train.learning_rate"),
    "zero_rank": ("train: {lora: {r: 0}}\n", "train.lora.r"),
    "unknown_method": ("train: {method: dpo}\n", "train.method"),
    "unknown_preset": ("train: {deepspeed: zero5}\n", "did you mean 'zero3'"),
    "fraction": ("data: {path: data/demo/train.jsonl, eval_fraction: 1.5}\n", "data.eval_fraction"),
    "wrong_type": ("train: {micro_batch_size: four}\n", "train.micro_batch_size"),
    "escape": ("run_name: ../../etc\n", "run_name"),
    "zero_steps": ("train: {max_steps: 0}\n", "train.max_steps"),
    "missing_ds_json": ("train: {deepspeed: nope/ds.json}\n", "nope/ds.json does not exist"),
    "unknown_metric": ("eval: {metrics: [rouge]}\n", "unknown metric 'rouge' (did you mean 'rouge_l'?)"),
    "gate_metric": (
        "eval: {metrics: [bleu], gate: {metric: rouge_l}}\n",
        "gate.metric 'rouge_l' is not computed",
    ),
    "merge_base": ("merge: {base: quantized}\n", "merge.base"),
    "qlora_zero3": ("train: {method: qlora, deepspeed: zero3}\n", "method qlora cannot use ZeRO-3"),
    "bits_without_qlora": (
        "train: {method: lora, quantization_bits: 8}\n",
        "quantization_bits: 8 applies to method qlora only, not lora",
    ),
    "bits_not_4_or_8": ("train: {method: qlora, quantization_bits: 3}\n", "quantization_bits"),
    "missing_hostfile": ("train: {hostfile: nope/hosts}\n", "hostfile nope/hosts does not exist"),
    # a data path that is plainly local is checked by validate, before `run` starts any server
    "missing_data_file": (
        "data: {path: data/demo/nope.jsonl}\n",
        "data.path: data/demo/nope.jsonl does not exist",
    ),
    "missing_absolute": (
        "data: {path: /nonexistent/train.jsonl}\n",
        "/nonexistent/train.jsonl does not exist",
    ),
    "missing_relative": ("data: {path: ./nope}\n", "data.path: ./nope does not exist"),
    "missing_in_list": ("data: {path: [data/demo/train.jsonl, more.csv]}\n", "more.csv does not exist"),
    "missing_eval_file": (
        "data: {path: data/demo/train.jsonl, eval_path: held_out.jsonl}\n",
        "data.eval_path: held_out.jsonl does not exist",
    ),
    "empty_glob": ("data: {path: 'data/demo/*.parquet'}\n", "matches no file"),
    "hub_name_offline": ("data: {path: someorg/somedata}\n", "HF_HUB_OFFLINE is set"),
    "no_eval_split": ("data: {path: data/demo/train.jsonl, eval_fraction: 0}\n", "eval_fraction must be > 0"),
    "adapter_rank": (
        "train: {lora: {r: 128}}\nserve: {mode: adapter}\n",
        "train.lora.r=128 exceeds serve.max_lora_rank",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_config_exits_2_naming_the_field(cli, tmp_path, case):
    body, expected = BAD[case]
    base = "run_name: t\ndata: {path: data/demo/train.jsonl}\n"
    path = tmp_path / "bad.yaml"
    # later keys win in YAML mappings, so the bad section replaces the base one
    path.write_text(base + body)
    res = cli("validate", str(path))
    assert res.returncode == 2, res.stdout + res.stderr
    assert expected in res.stderr
    assert "Traceback" not in res.stderr


def test_several_errors_are_all_reported(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "run_name: t\ndata: {path: x.jsonl, packing: maybe}\ntrain: {epochs: 0, lora: {alpha: -2}}\n"
    )
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    for field in ("data.packing", "train.epochs", "train.lora.alpha"):
        assert field in msg


@pytest.mark.parametrize(
    "text,expected",
    [
        ("", "the file is empty"),
        ("run_name: [unclosed\n", "YAML syntax error"),
        ("- a\n- b\n", "expected a mapping"),
    ],
)
def test_unreadable_files(tmp_path, text, expected):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expected):
        load_config(path)


def test_missing_file_and_bad_override(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        load_config("configs/tiny.yaml", ["train.epochs"])


def test_schema_command_prints_json_schema(cli):
    res = cli("schema")
    assert res.returncode == 0
    schema = json.loads(res.stdout)
    assert {"run_name", "data", "train", "eval", "tracking"} <= set(schema["properties"])


@pytest.mark.parametrize(
    "body",
    [
        "data: {path: data/demo/train.jsonl, eval_path: data/demo/train.jsonl, eval_fraction: 0}\n",  # no split needed
        "train: {lora: {r: 128}}\nserve: {mode: merged}\n",  # vLLM never sees a merged model's rank
    ],
)
def test_valid_edge_cases(cli, tmp_path, body):
    path = tmp_path / "ok.yaml"
    path.write_text("run_name: t\ndata: {path: data/demo/train.jsonl}\n" + body)
    res = cli("validate", str(path))
    assert res.returncode == 0, res.stderr


def test_hub_names_follow_the_environment_not_the_entry_point(cli, tmp_path):
    """The CLI no longer forces HF_HUB_OFFLINE (a deployment never did): the environment decides
    for both. Offline, a hub name is a validation error; online, it is accepted."""
    path = tmp_path / "hub.yaml"
    path.write_text("run_name: t\ndata: {path: someorg/somedata}\n")
    offline = cli("validate", str(path), env={"HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 2 and "data.path: 'someorg/somedata'" in offline.stderr
    online = cli("validate", str(path), env={"HF_HUB_OFFLINE": "0"})
    assert online.returncode == 0, online.stderr


@pytest.mark.parametrize(
    "sources, expected",
    [
        ("[{path: data/demo/train.jsonl}, {path: data/nope.jsonl, name: extra}]",
         "data.sources.1: source 'extra': data/nope.jsonl does not exist"),
        ("[{path: data/demo/train.jsonl, weight: 0, name: demo}]",
         "source 'demo': weight 0.0 must be > 0 (leave the source out instead)"),
        ("[{path: data/demo/train.jsonl, weight: 1, count: 5, name: demo}]",
         "source 'demo': give one of weight, count or fraction, not ['weight', 'count']"),
        ("[{path: data/demo/train.jsonl}, {path: data/demo/train.jsonl}]",
         "the name(s) ['data/demo/train.jsonl'] are used twice"),
        ("[{path: data/demo/train.jsonl, fraction: 1.5}]", "data.sources.0.fraction"),
    ],
)  # fmt: skip
def test_a_bad_data_mix_names_the_source(tmp_path, sources, expected):
    with pytest.raises(ConfigError) as err:
        load_config("configs/tiny.yaml", ["data.path=null", f"data.sources={sources}"])
    assert expected in str(err.value)


def test_data_path_and_sources_are_one_or_the_other():
    with pytest.raises(ConfigError, match="give data.path .one source. or data.sources .a mix., not both"):
        load_config("configs/tiny.yaml", ["data.sources=[{path: data/demo/train.jsonl}]"])
    cfg = load_config("configs/tiny.yaml", ["data.format=alpaca"])
    (only,) = cfg.data.mix()
    assert only.path == "data/demo/train.jsonl" and only.format == "alpaca"


def test_a_bad_hostfile_or_a_loopback_master_for_several_hosts_is_refused(tmp_path):
    bad = tmp_path / "bad"
    bad.write_text("h1 slots=1\nh2 slots=one\n")
    with pytest.raises(
        ConfigError, match=r"train.hostfile: .*bad:2: expected 'host slots=N', got 'h2 slots=one'"
    ):
        load_config("configs/tiny.yaml", [f"train.hostfile={bad}"])
    two = tmp_path / "two"
    two.write_text("# node 0 first\nh1 slots=1\nh2 slots=1\n")
    with pytest.raises(
        ConfigError, match="master_addr 127.0.0.1 is a loopback address, which the other hosts"
    ):
        load_config("configs/tiny.yaml", [f"train.hostfile={two}"])
    cfg = load_config("configs/tiny.yaml", [f"train.hostfile={two}", "train.master_addr=10.0.0.1"])
    assert cfg.train.launcher == "ssh" and cfg.train.rendezvous_timeout_s == 600
