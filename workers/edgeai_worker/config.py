"""Worker configuration, from a file (JSON or YAML), the environment, or a plan stage.

Precedence: defaults < file (`EDGEAI_CONFIG`) < environment (`EDGEAI_*`) < explicit
arguments. Field names in files are snake_case or the plan's camelCase.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import yaml

from edgeai_worker.offload.settings import OffloadSettings, OffloadSettingsError
from edgeai_worker.protocol import JSON_CODECS

TIERS = ("device", "edge", "cloud")


class ConfigError(ValueError):
    """A configuration value a user can fix: names the field, the problem and what's accepted."""

    def __init__(self, field_name: str, problem: str, accepted: str | None = None) -> None:
        message = f"{field_name}: {problem}"
        if accepted:
            message += f" (accepted: {accepted})"
        super().__init__(message)
        self.field_name = field_name


@dataclass(frozen=True)
class SplitOption:
    """A split the device stage may choose at run time: run `partition` (input -> cut) on
    the device and forward its outputs when the uplink is in [min_mbps, max_mbps). A
    `final` split holds the whole model: the device answers without forwarding."""

    partition: Path | None  # None: forward the raw input (device runs nothing)
    min_mbps: float = 0.0
    max_mbps: float = float("inf")
    predicted_latency_ms: float | None = None
    final: bool = False


@dataclass(frozen=True)
class WorkerConfig:
    model_name: str = "model"
    model_version: str = "1"
    # ONNX partitions this stage serves; empty means the stage only forwards.
    partitions: tuple[Path, ...] = ()
    stage_index: int = 0
    tier: str = "edge"
    host: str = "127.0.0.1"
    port: int = 8000
    # The gRPC endpoint's port (the same protocol over gRPC); None: REST only.
    grpc_port: int | None = None
    # Replicas of the next stage (all "http(s)://host:port" or all "grpc(s)://host:port");
    # empty for the last stage.
    next_urls: tuple[str, ...] = ()
    forward_timeout_s: float = 30.0
    forward_attempts: int = 3
    max_batch: int = 1
    max_wait_ms: float = 2.0
    max_queue: int = 1024
    max_body_bytes: int = 64 * 1024 * 1024
    intra_op_threads: int = 1
    shutdown_grace_s: float = 10.0
    dedupe_entries: int = 1024
    # The queue priority of a request that carries no `parameters.priority` (the
    # deployment's spec.priority): a saturated stage serves higher priorities first.
    default_priority: int = 0
    # Device stage.
    splits: tuple[SplitOption, ...] = ()
    uplink_mbps: float | None = None  # fixed uplink instead of measuring it
    uplink_probe_interval_s: float = 2.0  # probe when forwards gave no sample this long
    skip_unchanged_threshold: float = 0.0
    feature_noise_std: float = 0.0
    raw_input_stays_on_device: bool = False
    noise_seed: int | None = None
    # The last dense layer on ciphertexts (edgeai_worker.he): the device encrypts what it
    # forwards and decrypts the answer; the stage after it evaluates its one dense layer.
    homomorphic_head: bool = False
    # The whole model, answered on the device when the next stage fails, answers later
    # than `fallback_after_ms`, or failed less than `fallback_cooldown_s` ago.
    fallback_model: Path | None = None
    fallback_after_ms: float = 1000.0
    fallback_cooldown_s: float = 5.0
    # Input-wise partitioning: run this conv prefix as tiles on peer workers (which serve
    # it under this model's name), then this stage's partitions on the stitched output.
    tile_prefix: Path | None = None
    tile_peers: tuple[str, ...] = ()
    tile_grid: tuple[int, int] = (2, 2)
    log_json: bool = False
    # The REST codec's JSON path: "orjson" or "stdlib" (Python's json module, the
    # slower path orjson replaced; kept to measure the two side by side).
    json_codec: str = "orjson"
    # What the served model is (reported in its metadata): the prepared artefact's
    # sha256 digest and URI, and the plan's variant.
    model_digest: str | None = None
    model_variant: str | None = None
    model_uri: str | None = None
    # Who may talk to this stage (security.py): mutual TLS with the deployment's other
    # stages (a Secret's tls.crt, tls.key and ca.crt in tls_dir; inference served over
    # TLS on tls_port to the identities in tls_peers; https:// next URLs) and the entry's
    # bearer token; both files are re-read every security_reload_s seconds. With
    # entry_client_ca_file the TLS port serves the entry's clients instead of upstream
    # stages: any client certificate signed by that CA (a mounted Secret's ca.crt).
    tls_dir: Path | None = None
    tls_port: int | None = None
    tls_peers: tuple[str, ...] = ()
    entry_token_file: Path | None = None
    entry_client_ca_file: Path | None = None
    security_reload_s: float = 5.0
    # Per-input offloading: early exits, cascade, result reuse (edgeai_worker.offload).
    offload: OffloadSettings | None = None

    def __post_init__(self) -> None:
        self._check_security()
        if self.tier not in TIERS:
            raise ConfigError("tier", f"{self.tier!r} is not a tier", ", ".join(TIERS))
        for name in ("max_batch", "forward_attempts", "max_queue", "intra_op_threads"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be at least 1, got {getattr(self, name)}")
        if self.uplink_probe_interval_s <= 0:
            raise ConfigError("uplink_probe_interval_s", "must be positive")
        for name in ("fallback_after_ms", "fallback_cooldown_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(name, f"must be positive, got {getattr(self, name)}")
        if self.fallback_model is not None and not self.is_device:
            raise ConfigError(
                "fallback_model", f"a {self.tier} stage cannot answer alone", "device stages"
            )
        for name in ("max_wait_ms", "forward_timeout_s", "feature_noise_std"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must not be negative, got {getattr(self, name)}")
        if not 0.0 <= self.skip_unchanged_threshold < 1.0:
            raise ConfigError(
                "skip_unchanged_threshold",
                f"{self.skip_unchanged_threshold} is out of range",
                "0 (off) to below 1, a fraction of the input's value range",
            )
        if self.tile_peers and self.tile_prefix is None:
            raise ConfigError("tile_prefix", "tile_peers are set but no prefix model to tile")
        if len(self.tile_grid) != 2 or min(self.tile_grid) < 1:
            raise ConfigError(
                "tile_grid", f"{self.tile_grid} is not a grid", "[rows, columns] >= 1"
            )
        grpc_next = [u for u in self.next_urls if u.startswith(("grpc://", "grpcs://"))]
        if grpc_next and len(grpc_next) != len(self.next_urls):
            raise ConfigError(
                "next_urls",
                f"replicas mix grpc:// and http:// URLs: {', '.join(self.next_urls)}",
                "all http(s)://host:port or all grpc(s)://host:port",
            )
        if grpc_next and self.is_device and self.uplink_mbps is None:
            raise ConfigError(
                "next_urls",
                "a device stage measures its uplink over HTTP, so it cannot forward over gRPC",
                "http:// replicas, or grpc:// ones with a fixed uplink_mbps",
            )
        if self.json_codec not in JSON_CODECS:
            raise ConfigError(
                "json_codec", f"{self.json_codec!r} is not a JSON codec", ", ".join(JSON_CODECS)
            )
        if not (0 < self.port < 65536):
            raise ConfigError("port", f"{self.port} is not a TCP port", "1-65535")
        if self.grpc_port is not None and not (0 < self.grpc_port < 65536):
            raise ConfigError("grpc_port", f"{self.grpc_port} is not a TCP port", "1-65535")
        if self.grpc_port == self.port:
            raise ConfigError(
                "grpc_port", f"{self.grpc_port} is also the REST port", "a port other than port"
            )
        if self.raw_input_stays_on_device and self.tier == "device":
            if not self.next_urls:
                return
            if not self.partitions and not any(s.partition for s in self.splits):
                raise ConfigError(
                    "privacy.rawInputStaysOnDevice",
                    "the device stage holds no layers, so it would forward the raw input",
                    "a plan with at least one layer on the device",
                )

    def _check_security(self) -> None:
        https_next = [u for u in self.next_urls if u.startswith(("https://", "grpcs://"))]
        if https_next and self.tls_dir is None:
            raise ConfigError(
                "next_urls",
                "https:// and grpcs:// replicas need this stage's certificate",
                "set tls_dir",
            )
        if self.tls_port is not None:
            if self.tls_dir is None:
                raise ConfigError("tls_port", "needs tls_dir (the certificate to serve)")
            if not (0 < self.tls_port < 65536) or self.tls_port in (self.port, self.grpc_port):
                raise ConfigError(
                    "tls_port", f"{self.tls_port} is not a free TCP port", "1-65535, not port"
                )
            if self.entry_client_ca_file is not None and self.tls_peers:
                raise ConfigError(
                    "tls_peers",
                    "the TLS port serves the entry's clients (entry_client_ca_file)",
                    "tls_peers or entry_client_ca_file, not both",
                )
            if not self.tls_peers and self.entry_client_ca_file is None:
                raise ConfigError(
                    "tls_peers",
                    "no peer may call the TLS port",
                    "the upstream stages' identities, or entry_client_ca_file",
                )
        elif self.entry_client_ca_file is not None:
            raise ConfigError(
                "entry_client_ca_file",
                "needs tls_port (the port that serves the entry's clients over TLS)",
                "set tls_port and tls_dir",
            )
        if self.security_reload_s <= 0:
            raise ConfigError("security_reload_s", "must be positive")

    @property
    def is_device(self) -> bool:
        return self.tier == "device"


_ALIASES = {
    "name": "model_name",
    "modelName": "model_name",
    "version": "model_version",
    "modelVersion": "model_version",
    "stageIndex": "stage_index",
    "index": "stage_index",
    "next": "next_urls",
    "nextUrls": "next_urls",
    "forwardTimeoutS": "forward_timeout_s",
    "forwardAttempts": "forward_attempts",
    "maxBatch": "max_batch",
    "maxWaitMs": "max_wait_ms",
    "maxQueue": "max_queue",
    "maxBodyBytes": "max_body_bytes",
    "grpcPort": "grpc_port",
    "intraOpThreads": "intra_op_threads",
    "shutdownGraceS": "shutdown_grace_s",
    "defaultPriority": "default_priority",
    "uplinkMbps": "uplink_mbps",
    "uplinkProbeIntervalS": "uplink_probe_interval_s",
    "skipUnchangedThreshold": "skip_unchanged_threshold",
    "featureNoiseStd": "feature_noise_std",
    "rawInputStaysOnDevice": "raw_input_stays_on_device",
    "noiseSeed": "noise_seed",
    "homomorphicHead": "homomorphic_head",
    "fallbackModel": "fallback_model",
    "fallbackAfterMs": "fallback_after_ms",
    "fallbackCooldownS": "fallback_cooldown_s",
    "logJson": "log_json",
    "jsonCodec": "json_codec",
    "tilePrefix": "tile_prefix",
    "tilePeers": "tile_peers",
    "tileGrid": "tile_grid",
    "modelDigest": "model_digest",
    "modelVariant": "model_variant",
    "modelUri": "model_uri",
    "tlsDir": "tls_dir",
    "tlsPort": "tls_port",
    "tlsPeers": "tls_peers",
    "entryTokenFile": "entry_token_file",
    "entryClientCaFile": "entry_client_ca_file",
    "securityReloadS": "security_reload_s",
}


def _split_option(obj: Mapping[str, Any], base: Path) -> SplitOption:
    partition = obj.get("partition")
    return SplitOption(
        partition=(base / str(partition)) if partition else None,
        min_mbps=float(obj.get("minMbps", obj.get("min_mbps", 0.0))),
        max_mbps=float(obj.get("maxMbps", obj.get("max_mbps", float("inf")))),
        predicted_latency_ms=obj.get("predictedLatencyMs", obj.get("predicted_latency_ms")),
        final=bool(obj.get("final", False)),
    )


def _coerce(name: str, value: Any, base: Path) -> Any:
    """Turn a file or environment value into the field's type."""
    kinds = {f.name: f.type for f in fields(WorkerConfig)}
    kind = str(kinds[name])
    if name == "offload":
        if value in (None, "") or isinstance(value, OffloadSettings):
            return value or None
        data = json.loads(value) if isinstance(value, str) else dict(value)
        try:
            return OffloadSettings.from_dict(data, base)
        except OffloadSettingsError as exc:
            field_name, _, problem = str(exc).partition(": ")
            raise ConfigError(field_name, problem) from None
    try:
        if name == "partitions":
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(base / str(p) for p in items if str(p))
        if name in ("tile_prefix", "fallback_model"):
            return None if value in (None, "") else base / str(value)
        if name == "tile_grid":
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(int(v) for v in items)
        if name in ("tls_dir", "entry_token_file", "entry_client_ca_file"):
            return None if value in (None, "") else base / str(value)
        if name in ("next_urls", "tile_peers", "tls_peers"):
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(str(u).rstrip("/") for u in items if str(u))
        if name == "splits":
            options: list[Any] = json.loads(value) if isinstance(value, str) else list(value)
            return tuple(_split_option(dict(option), base) for option in options)
        if kind.startswith("bool"):
            if isinstance(value, str):
                return value.strip().lower() in ("1", "true", "yes", "on")
            return bool(value)
        if kind.startswith("int"):
            return int(value)
        if kind.startswith("float | None"):
            return None if value in (None, "") else float(value)
        if kind.startswith("int | None"):
            return None if value in (None, "") else int(value)
        if kind.startswith("float"):
            return float(value)
        if kind.startswith("str | None"):
            return None if value in (None, "") else str(value)
        return str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(name, f"cannot read {value!r:.60}: {exc}") from None


def _apply(
    config: WorkerConfig, values: Mapping[str, Any], base: Path, source: str
) -> WorkerConfig:
    known = {f.name for f in fields(WorkerConfig)}
    changes: dict[str, Any] = {}
    for key, value in values.items():
        name = _ALIASES.get(key, key)
        if name not in known:
            raise ConfigError(f"{source}: {key}", "unknown setting", ", ".join(sorted(known)))
        changes[name] = _coerce(name, value, base)
    return replace(config, **changes)


def load_config(
    path: Path | None = None,
    environ: Mapping[str, str] | None = None,
    **overrides: Any,
) -> WorkerConfig:
    """Build a WorkerConfig from a file, `EDGEAI_*` variables and explicit overrides."""
    env = os.environ if environ is None else environ
    config = WorkerConfig()
    if path is None and env.get("EDGEAI_CONFIG"):
        path = Path(env["EDGEAI_CONFIG"])
    if path is not None:
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError("EDGEAI_CONFIG", f"cannot read {path}: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError("EDGEAI_CONFIG", f"{path} must hold a mapping of settings")
        config = _apply(config, data, path.parent, str(path))
    # Other tools share the EDGEAI_ prefix (EDGEAI_CACHE_DIR, ...): only known names apply.
    known = {f.name for f in fields(WorkerConfig)}
    from_env = {
        key[len("EDGEAI_") :].lower(): value
        for key, value in env.items()
        if key.startswith("EDGEAI_") and key[len("EDGEAI_") :].lower() in known
    }
    config = _apply(config, from_env, Path.cwd(), "environment")
    return _apply(
        config, {k: v for k, v in overrides.items() if v is not None}, Path.cwd(), "argument"
    )


def stage_config(
    plan: Mapping[str, Any],
    stage_index: int,
    partitions: Sequence[Path],
    next_urls: Sequence[str] = (),
    splits: Sequence[SplitOption] = (),
    **overrides: Any,
) -> WorkerConfig:
    """The config of one stage of a Plan (`kind: Plan`), given its partition files."""
    stages = plan.get("stages") or []
    if not 0 <= stage_index < len(stages):
        raise ConfigError("stage_index", f"{stage_index} is out of range", f"0-{len(stages) - 1}")
    stage = stages[stage_index]
    model = plan.get("model") or {}
    name = str(overrides.pop("model_name", None) or model.get("zoo") or model.get("name", "model"))
    return WorkerConfig(
        model_name=name,
        model_version=str(model.get("version", "1")),
        partitions=tuple(partitions),
        stage_index=stage_index,
        tier=str(stage.get("tier", "edge")),
        next_urls=tuple(next_urls),
        splits=tuple(splits),
        **overrides,
    )
