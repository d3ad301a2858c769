"""The one configuration tree of moeserve.

Every setting has a key here. Values come from four layers, highest first:

1. CLI flags (and `LLM(model, **overrides)`), passed to :func:`load_config` as ``overrides``;
2. ``MOESERVE_<KEY>`` environment variables (``MOESERVE_MAX_NUM_SEQS=8``);
3. a YAML file (``--config configs/demo.yaml``), a flat mapping of keys;
4. the defaults below.

Unknown keys are errors in every layer (a YAML key, a ``MOESERVE_*`` variable, an override), and an invalid
value is reported with its key and the allowed values or range, all problems at once, as a
:class:`ConfigError`.
"""

from __future__ import annotations

import contextvars
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import annotated_types
import yaml
from pydantic import ByteSize, Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, YamlConfigSettingsSource

if TYPE_CHECKING:
    import torch

ENV_PREFIX = "MOESERVE_"

# The YAML file of the load in progress; read by Config's source list (see Config.settings_customise_sources).
_yaml_file: contextvars.ContextVar[Path | None] = contextvars.ContextVar("moeserve_yaml_file", default=None)


class ConfigError(ValueError):
    """A configuration problem: unknown keys or invalid values, each named in the message."""


class Config(BaseSettings):
    """All of moeserve's settings, flat: a key here is a YAML key, a CLI flag and a ``MOESERVE_*`` variable."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="forbid", validate_default=True, hide_input_in_errors=False
    )

    # --- model ---
    model: str | None = Field(None, description="Hugging Face model directory (config.json, *.safetensors, tokenizer).")
    served_model_name: str | None = Field(None, description="Model id in the API; defaults to the directory's basename.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Compute dtype of the resident weights; auto = the checkpoint's own."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="Where the model computes: 'cuda' (a GPU; an error at start-up without one), 'cpu', or 'auto' "
        "(cuda when torch sees a GPU, else cpu).",
    )
    max_model_len: int | None = Field(
        None, ge=16, le=1 << 20, description="Longest prompt + completion in tokens; unset = the model's limit."
    )

    # --- scheduler and KV cache ---
    max_num_seqs: int = Field(16, ge=1, le=4096, description="Most sequences running in one step.")
    max_num_batched_tokens: int = Field(
        512, ge=16, le=1 << 20, description="Token budget of one step (prefill chunks + decodes)."
    )
    num_kv_blocks: int | None = Field(
        None, ge=1, le=1 << 24, description="KV-cache blocks of 16 tokens; unset = sized from max_model_len and max_num_seqs."
    )
    enable_prefix_caching: bool = Field(True, description="Reuse KV blocks of prompt prefixes already computed.")
    max_waiting: int = Field(256, ge=1, le=1 << 20, description="Requests queued beyond which the server answers 429.")

    # --- expert offloading ---
    expert_cache_bytes: ByteSize | None = Field(
        None,
        ge=0,
        description="Budget of the fastest expert tier present (host RAM on a CPU machine, GPU memory with a GPU), "
        "e.g. '4GiB'; unset = all experts resident.",
    )
    host_cache_bytes: ByteSize | None = Field(
        None,
        ge=0,
        description="Pinned host-RAM expert tier between the disk and the GPU's expert cache; applies only on a GPU "
        "(unset there = 2 x top_k + 8 expert blobs).",
    )
    offload_dir: Path | None = Field(
        None, description="Where prepared expert stores live; unset = ~/.cache/moeserve keyed by source fingerprint."
    )
    expert_prefetch: Literal["none", "lookahead", "trace", "all"] = Field(
        "all",
        description="Offload mode's prefetch sources: 'lookahead' (the next layer's router on this layer's input), "
        "'trace' (predictions from the running requests' traces and the trace store, which also set the cache's "
        "priorities), 'all' (both) or 'none' (on-demand reads, LRU).",
    )
    expert_prefetch_gate: bool = Field(
        True,
        description="Let prefetch and predicted priorities act only while they beat on-demand LRU, judged every 16+ "
        "steps against shadow caches fed the same accesses (engine/offload/gate.py); false: they always act.",
    )

    # --- tracing ---
    trace_store_path: Path | None = Field(None, description="File the shared trace store and transition statistics persist to.")
    trace_dump_dir: Path | None = Field(None, description="Directory where each finished request's trace is written.")

    # --- server ---
    host: str = Field("127.0.0.1", min_length=1, description="Address the HTTP server binds.")
    port: int = Field(8000, ge=0, le=65535, description="Port the HTTP server binds (0 = any free port).")
    api_key: SecretStr | None = Field(None, description="Bearer key required on every API request when set.")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Logging level.")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Highest priority first: overrides (CLI) > environment > YAML file > field defaults."""
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        yaml_file = _yaml_file.get()
        if yaml_file is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=yaml_file))
        return tuple(sources)


def resolve_device(device: str) -> torch.device:
    """The torch device of the ``device`` key: ``auto`` is cuda when torch sees a GPU, else cpu.

    ConfigError for ``cuda`` when torch sees none (a CPU-only torch build, or no GPU visible)."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device: 'cuda' was requested but torch {torch.__version__} sees no GPU "
            f"(built with CUDA {torch.version.cuda or 'none'}); use device 'cpu' or 'auto'"
        )
    return torch.device(device)


def config_keys() -> list[str]:
    """Every valid configuration key, in declaration order."""
    return list(Config.model_fields)


def load_config(
    config_file: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the configuration from defaults, a YAML file, ``MOESERVE_*`` variables and overrides.

    ``overrides`` entries whose value is None are ignored (an argparse flag that was not given).
    The environment is the process's own (``os.environ``). Raises :class:`ConfigError` naming every unknown key and
    every invalid value with its allowed range.
    """
    given = {key: value for key, value in (overrides or {}).items() if value is not None}
    yaml_path = _check_yaml_file(config_file)
    unknown = [f"{key} (override)" for key in given if key not in Config.model_fields]
    unknown += [f"{name} (environment)" for name in _unknown_env_names(os.environ)]
    if unknown:
        raise ConfigError(f"unknown configuration keys: {', '.join(unknown)}; valid keys: {', '.join(config_keys())}")
    token = _yaml_file.set(yaml_path)
    try:
        return Config(**given)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, yaml_path)) from None
    finally:
        _yaml_file.reset(token)


def _check_yaml_file(config_file: str | Path | None) -> Path | None:
    """The YAML path, after checking it exists and holds a flat mapping (or nothing)."""
    if config_file is None:
        return None
    path = Path(config_file)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values, not {type(data).__name__}")
    return path


def _unknown_env_names(environ: Mapping[str, str]) -> list[str]:
    """``MOESERVE_*`` variables that name no configuration key."""
    known = {ENV_PREFIX + key.upper() for key in Config.model_fields}
    return sorted(name for name in environ if name.upper().startswith(ENV_PREFIX) and name.upper() not in known)


def _describe(exc: ValidationError, yaml_path: Path | None) -> str:
    """One line per problem: key, what is wrong, the value given and the allowed values or range."""
    lines = []
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"]) or "<root>"
        if error["type"] == "extra_forbidden":
            where = f" in {yaml_path}" if yaml_path else ""
            lines.append(f"unknown configuration key {key!r}{where}; valid keys: {', '.join(config_keys())}")
            continue
        allowed = _allowed(key)
        suffix = f"; allowed: {allowed}" if allowed else ""
        lines.append(f"{key}: {error['msg']} (got {error.get('input')!r}){suffix}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def _allowed(key: str) -> str:
    """The numeric range of a constrained field, e.g. '1 <= max_num_seqs <= 4096', or ''."""
    field = Config.model_fields.get(key)
    if field is None:
        return ""
    low = high = None
    for item in field.metadata:
        if isinstance(item, annotated_types.Ge):
            low = f"{item.ge} <= "
        elif isinstance(item, annotated_types.Gt):
            low = f"{item.gt} < "
        elif isinstance(item, annotated_types.Le):
            high = f" <= {item.le}"
        elif isinstance(item, annotated_types.Lt):
            high = f" < {item.lt}"
    if low is None and high is None:
        return ""
    return f"{low or ''}{key}{high or ''}"
