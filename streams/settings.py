"""Process-wide settings, read once from the environment.

Every knob is an environment variable whose name is the field name upper-cased
(``KAFKA_BOOTSTRAP_SERVERS``, ``CDP_WRITE_KEYS``...). Unknown ``CDP_*`` variables
are rejected at start-up: a typo in a deployment manifest must fail loudly
instead of silently running with a default.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import Any

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: Env prefixes owned by other settings models (sinks, stack, audiences...).
#: The core settings leave those to their owners instead of rejecting them.
DELEGATED_PREFIXES: tuple[str, ...] = (
    "CDP_SINK_",
    "CDP_STACK_",
    "CDP_AUDIENCE",
    "CDP_BENCH_",
    "CDP_PROFILE_API",
    "CDP_STATUS_",
)


class UnknownSettingError(ValueError):
    """A ``CDP_*`` environment variable that no settings model declares."""


def reject_unknown_env(
    prefix: str,
    known: Iterable[str],
    delegated: Iterable[str] = (),
    environ: Mapping[str, str] | None = None,
) -> None:
    """Fail if the environment holds a variable under ``prefix`` that nobody reads."""
    env = os.environ if environ is None else environ
    known_upper = {k.upper() for k in known}
    delegated_t = tuple(delegated)
    unknown = sorted(
        key
        for key in env
        if key.upper().startswith(prefix)
        and key.upper() not in known_upper
        and not key.upper().startswith(delegated_t)
    )
    if unknown:
        raise UnknownSettingError(
            f"unknown setting(s) {', '.join(unknown)}; see README 'Configuration' for valid names"
        )


def write_key_id(key: str) -> str:
    """A stable, non-secret label for a write key (safe to store in events and logs)."""
    return "wk_" + hashlib.sha256(key.encode()).hexdigest()[:12]


class Settings(BaseSettings):
    """Core settings shared by the collector, the worker and the CLI."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    kafka_bootstrap_servers: str = Field(
        "localhost:9092", description="Kafka bootstrap servers (host:port, comma separated)."
    )
    schema_registry_url: str = Field(
        "http://localhost:8081/apis/ccompat/v7",
        description="Confluent-compatible schema registry base URL.",
    )
    kafka_security_protocol: str = Field("PLAINTEXT", description="PLAINTEXT, SSL, SASL_SSL...")
    kafka_sasl_mechanism: str | None = Field(None, description="PLAIN, SCRAM-SHA-256, ...")
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: str | None = None

    cdp_write_keys: SecretStr = Field(
        SecretStr(""), description="Comma-separated write keys the collector accepts."
    )
    cdp_collector_host: str = "127.0.0.1"
    cdp_collector_port: int = Field(8088, ge=1, le=65535)
    cdp_topic_partitions: int = Field(6, ge=1, le=1024)
    cdp_topic_replication: int = Field(1, ge=1, le=16)
    cdp_worker_id: str = Field("cdpflow-worker", description="Faust app id / consumer group.")
    cdp_worker_web_port: int = Field(6066, ge=1, le=65535)
    cdp_worker_web_bind: str = Field("127.0.0.1", description="0.0.0.0 to serve beyond loopback.")
    cdp_worker_web_enabled: bool = Field(True, description="Serve Faust's web views / metrics.")
    cdp_worker_data_dir: str = Field(".stack/worker", description="Faust data directory.")
    cdp_worker_session_timeout_s: float = Field(
        30.0, ge=6, le=300, description="How soon a dead worker's partitions move to another."
    )
    cdp_worker_batch_size: int = Field(500, ge=1, le=100_000)
    cdp_worker_batch_within_s: float = Field(
        0.005, gt=0, le=10, description="Longest an event waits for others to join its batch."
    )
    cdp_max_future_skew_s: int = Field(
        24 * 3600, ge=0, description="Reject events whose timestamp is further in the future."
    )
    cdp_max_event_age_days: int = Field(
        5 * 365, ge=1, description="Reject events whose timestamp is older than this."
    )
    cdp_max_event_bytes: int = Field(32 * 1024, ge=1024)
    cdp_max_nesting_depth: int = Field(16, ge=1, le=256)
    cdp_log_level: str = "INFO"

    @field_validator("kafka_security_protocol")
    @classmethod
    def _upper(cls, v: str) -> str:
        return v.upper()

    @model_validator(mode="after")
    def _no_unknown_cdp_env(self) -> Settings:
        reject_unknown_env("CDP_", type(self).model_fields, DELEGATED_PREFIXES)
        return self

    def write_keys(self) -> frozenset[str]:
        raw = self.cdp_write_keys.get_secret_value()
        return frozenset(k.strip() for k in raw.split(",") if k.strip())

    def librdkafka_common(self) -> dict[str, Any]:
        """Connection settings shared by every confluent-kafka client we create."""
        conf: dict[str, Any] = {
            "bootstrap.servers": self.kafka_bootstrap_servers,
            "security.protocol": self.kafka_security_protocol,
        }
        if self.kafka_sasl_mechanism:
            conf["sasl.mechanism"] = self.kafka_sasl_mechanism
        if self.kafka_sasl_username:
            conf["sasl.username"] = self.kafka_sasl_username
        if self.kafka_sasl_password is not None:
            conf["sasl.password"] = self.kafka_sasl_password.get_secret_value()
        if self.kafka_ssl_cafile:
            conf["ssl.ca.location"] = self.kafka_ssl_cafile
        return conf

    def reliable_producer_config(self, **overrides: Any) -> dict[str, Any]:
        """Idempotent, acks=all producer that partitions keys like the Java client.

        ``murmur2_random`` matters: Faust (aiokafka) and Java producers hash keys
        with murmur2, librdkafka's default is CRC32. Mixing them would send one
        user's events to two partitions and break per-user order.
        """
        conf = self.librdkafka_common()
        conf.update(
            {
                "enable.idempotence": True,
                "acks": "all",
                "partitioner": "murmur2_random",
                "linger.ms": 5,
                "compression.type": "lz4",
                "message.timeout.ms": 30_000,
            }
        )
        conf.update(overrides)
        return conf


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
