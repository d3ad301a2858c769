"""The config tree: precedence CLI > MOESERVE_* environment > YAML > defaults, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from engine.config import Config, ConfigError, load_config, resolve_device

REPO = Path(__file__).resolve().parents[2]


def write_yaml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_defaults_without_any_source() -> None:
    config = load_config()
    assert config == Config.model_construct(**{key: field.default for key, field in Config.model_fields.items()})
    assert config.max_num_seqs == 16 and config.enable_prefix_caching is True and config.port == 8000


def test_yaml_overrides_defaults(tmp_path: Path) -> None:
    config = load_config(write_yaml(tmp_path, "max_num_seqs: 3\ndtype: bfloat16\n"))
    assert (config.max_num_seqs, config.dtype, config.max_num_batched_tokens) == (3, "bfloat16", 512)


def test_environment_overrides_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOESERVE_MAX_NUM_SEQS", "5")
    monkeypatch.setenv("MOESERVE_ENABLE_PREFIX_CACHING", "false")
    config = load_config(write_yaml(tmp_path, "max_num_seqs: 3\nport: 9001\n"))
    assert (config.max_num_seqs, config.enable_prefix_caching, config.port) == (5, False, 9001)


def test_cli_overrides_environment_and_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOESERVE_MAX_NUM_SEQS", "5")
    monkeypatch.setenv("MOESERVE_PORT", "9002")
    config = load_config(write_yaml(tmp_path, "max_num_seqs: 3\n"), {"max_num_seqs": 7, "port": None})
    assert config.max_num_seqs == 7
    assert config.port == 9002, "a flag that was not given (None) must not hide the environment"


def test_api_key_from_environment_is_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOESERVE_API_KEY", "s3cret")
    config = load_config()
    assert config.api_key.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(config)


def test_byte_sizes_accept_units() -> None:
    config = load_config(overrides={"expert_cache_bytes": "4GiB", "host_cache_bytes": 1000})
    assert (config.expert_cache_bytes, config.host_cache_bytes) == (4 << 30, 1000)


def test_unknown_yaml_key_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown configuration key 'max_num_seq'"):
        load_config(write_yaml(tmp_path, "max_num_seq: 3\n"))


def test_unknown_environment_variable_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOESERVE_MAX_SEQS", "3")
    with pytest.raises(ConfigError, match=r"MOESERVE_MAX_SEQS \(environment\)"):
        load_config()


def test_unknown_override_is_named() -> None:
    with pytest.raises(ConfigError, match=r"unknown configuration keys: kv_blocks \(override\)"):
        load_config(overrides={"kv_blocks": 3})


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("max_num_seqs", 0, "allowed: 1 <= max_num_seqs <= 4096"),
        ("max_num_batched_tokens", 8, "allowed: 16 <= max_num_batched_tokens"),
        ("port", 70000, "allowed: 0 <= port <= 65535"),
        ("expert_cache_bytes", -1, "allowed: 0 <= expert_cache_bytes"),
        ("dtype", "fp8", "'auto', 'float32', 'bfloat16' or 'float16'"),
        ("log_level", "loud", "'debug', 'info', 'warning' or 'error'"),
        ("enable_prefix_caching", "maybe", "enable_prefix_caching: Input should be a valid boolean"),
        ("device", "tpu", "'auto', 'cpu' or 'cuda'"),
    ],
)
def test_invalid_value_names_key_and_allowed_values(key: str, value: object, expected: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(overrides={key: value})
    message = str(error.value)
    assert message.startswith("invalid configuration:") and f"{key}:" in message
    assert expected in message
    assert repr(value) in message


def test_invalid_environment_value_is_reported_with_its_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOESERVE_MAX_NUM_SEQS", "many")
    with pytest.raises(ConfigError, match=r"max_num_seqs: Input should be a valid integer.*'many'"):
        load_config()


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(write_yaml(tmp_path, "max_num_seqs: 0\nport: -1\n"))
    assert "max_num_seqs:" in str(error.value) and "port:" in str(error.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("- a\n- b\n", "must hold a mapping"), ("a: [1,\n", "is not valid YAML")],
)
def test_malformed_yaml_file(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_config(write_yaml(tmp_path, text))


def test_missing_yaml_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")


def test_empty_yaml_file_means_defaults(tmp_path: Path) -> None:
    assert load_config(write_yaml(tmp_path, "# nothing set\n")) == load_config()


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_config_files_are_valid(path: Path) -> None:
    keys = set(yaml.safe_load(path.read_text()) or {})
    config = load_config(path)
    assert config.model_fields_set == keys, "every key in the file is a config key and is applied"


def test_device_comes_from_the_environment_and_resolves(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_config().device == "auto"
    monkeypatch.setenv("MOESERVE_DEVICE", "cpu")
    assert load_config().device == "cpu"
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: device 'cuda' resolves")
def test_device_cuda_without_a_gpu_is_a_configuration_error() -> None:
    with pytest.raises(ConfigError, match="device: 'cuda' was requested but torch .* sees no GPU"):
        resolve_device("cuda")
