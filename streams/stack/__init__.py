"""A real single-node Kafka (KRaft) and Apicurio Registry for development, without Docker.

Both servers run from pinned Maven Central artifacts, so a laptop, CI and the
demo all talk to the same broker and registry versions as production-like
code paths (no mocks, no in-memory fakes). Everything lives under one
directory (``<repo>/.stack`` or ``CDP_STACK_DIR``) so ``rm -rf`` is a full reset.

This module holds only the shared vocabulary (settings, errors, pinned
versions, paths) so that ``maven``, ``kafka``, ``registry`` and ``manager``
can import it without import cycles. The entry points are
:class:`streams.stack.manager.StackManager` and ``cdpflow stack`` (``cli.py``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from streams.settings import reject_unknown_env

#: Pinned so every machine runs the broker the clients were tested against.
KAFKA_VERSION = "4.0.1"
#: log4j2 backend for the broker: the kafka_2.13 POM ships no logging backend.
LOG4J_VERSION = "2.24.3"
#: Preferred registry; needs Java >= 21 (class file 65).
APICURIO_VERSION = "3.3.3"
#: Registry used when no Java >= 21 exists (it runs on Java 17).
APICURIO_FALLBACK_VERSION = "2.6.13.Final"
#: Pinned so Maven 3.8's default (2.8) never decides how jars are collected.
DEPENDENCY_PLUGIN = "org.apache.maven.plugins:maven-dependency-plugin:3.8.1"

ENV_PREFIX = "CDP_STACK_"
HOST = "127.0.0.1"
#: Confluent-compatible API path; both registry lines serve it.
CCOMPAT_PATH = "/apis/ccompat/v7"


class StackError(RuntimeError):
    """The local stack cannot do what was asked; the message says what to do instead."""


def _repo_root() -> Path:
    """The checkout when installed editable, else the working directory.

    Keeping the stack next to the code means two checkouts never share a
    broker's data by accident.
    """
    candidate = Path(__file__).resolve().parents[2]
    if (candidate / "pyproject.toml").is_file():
        return candidate
    return Path.cwd()


_HEAP_RE = re.compile(r"^[1-9][0-9]*[mMgG]$")


class StackSettings(BaseSettings):
    """Where the stack lives and which ports it binds (env ``CDP_STACK_*``)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, case_sensitive=False, extra="ignore")

    dir: Path = Field(
        default_factory=lambda: _repo_root() / ".stack",
        description="Root for data, logs, configs and the state file.",
    )
    cache_dir: Path | None = Field(
        default=None,
        description="Downloaded jars and the unpacked registry; default <dir>/cache. Share it "
        "between stacks to download once.",
    )
    kafka_port: int = Field(default=9092, ge=1, le=65535)
    controller_port: int = Field(default=9093, ge=1, le=65535)
    registry_port: int = Field(default=8081, ge=1, le=65535)
    registry_mgmt_port: int = Field(default=9001, ge=1, le=65535)
    kafka_heap: str = Field(default="768m", description="JVM -Xmx for the broker, e.g. 768m or 1g.")
    registry_heap: str = Field(default="512m", description="JVM -Xmx for the registry.")
    kafka_java: Path | None = Field(
        default=None, description="java binary for Kafka (needs >= 17)."
    )
    registry_java: Path | None = Field(
        default=None,
        description="java binary for the registry. >= 21 runs Apicurio 3.x; 17-20 selects the "
        "2.6 fallback. Default: the newest JDK found.",
    )
    registry_storage: Literal["auto", "kafkasql", "h2"] = Field(
        default="auto",
        description="auto = KafkaSQL on Apicurio 3.x, H2 file on the 2.6 fallback.",
    )
    start_timeout_s: float = Field(default=90.0, gt=0, le=1800)
    stop_timeout_s: float = Field(default=60.0, gt=0, le=600)

    @field_validator("dir", "cache_dir", "kafka_java", "registry_java")
    @classmethod
    def _absolute(cls, v: Path | None) -> Path | None:
        # Absolute paths: they end up in java command lines and in the PID
        # ownership check, which must not depend on the caller's cwd.
        return None if v is None else v.expanduser().resolve()

    @field_validator("kafka_heap", "registry_heap")
    @classmethod
    def _heap(cls, v: str) -> str:
        if not _HEAP_RE.match(v):
            raise ValueError(f"heap size {v!r} must look like 512m or 1g")
        return v

    @model_validator(mode="after")
    def _check(self) -> StackSettings:
        reject_unknown_env(ENV_PREFIX, [ENV_PREFIX + name for name in type(self).model_fields])
        ports = [self.kafka_port, self.controller_port, self.registry_port, self.registry_mgmt_port]
        if len(set(ports)) != len(ports):
            raise ValueError(f"stack ports must be distinct, got {ports}")
        return self


@dataclass(frozen=True)
class StackPaths:
    """The directory layout, derived once from the settings."""

    root: Path
    cache: Path

    @classmethod
    def from_settings(cls, settings: StackSettings) -> StackPaths:
        return cls(root=settings.dir, cache=settings.cache_dir or settings.dir / "cache")

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def kafka_data(self) -> Path:
        return self.data / "kafka"

    @property
    def registry_data(self) -> Path:
        return self.data / "registry"

    @property
    def conf(self) -> Path:
        return self.root / "conf"

    @property
    def jvm_cache(self) -> Path:
        """Class-data-sharing archives: per stack dir, since the JVM rewrites them at exit."""
        return self.root / "jvm"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    @property
    def lock_file(self) -> Path:
        return self.root / ".lock"

    def log(self, component: str) -> Path:
        return self.logs / f"{component}.log"

    @property
    def owner_marker(self) -> str:
        """A JVM flag put on every command line we start.

        ``down`` kills a PID only if its command line carries this exact flag,
        so a recycled PID or another engineer's stack is never touched.
        """
        return f"-Dcdpflow.stack.dir={self.root}"


__all__ = [
    "APICURIO_FALLBACK_VERSION",
    "APICURIO_VERSION",
    "CCOMPAT_PATH",
    "DEPENDENCY_PLUGIN",
    "HOST",
    "KAFKA_VERSION",
    "LOG4J_VERSION",
    "StackError",
    "StackPaths",
    "StackSettings",
]
