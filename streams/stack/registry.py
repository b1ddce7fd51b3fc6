"""Apicurio Registry: which release fits the installed Java, and how to run it durably.

Confluent's registry is not on Maven Central, Apicurio is, and its
Confluent-compatible API (``/apis/ccompat/v7``) is what the serializers speak.
Apicurio 3.x needs Java 21; machines with only Java 17 get the 2.6 line.

Storage must outlive a restart, because records in Kafka carry schema ids:
3.x journals into Kafka itself (KafkaSQL), so schemas live and die with the
broker's data; the 2.6 artifact on Central has no KafkaSQL module, so it keeps
an H2 database file next to the Kafka data instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import httpx

from streams.stack import (
    APICURIO_FALLBACK_VERSION,
    APICURIO_VERSION,
    CCOMPAT_PATH,
    HOST,
    StackError,
    StackPaths,
    StackSettings,
)

Storage = Literal["kafkasql", "h2"]


@dataclass(frozen=True)
class RegistryRelease:
    version: str
    min_java: int
    jar_name: str
    storages: tuple[Storage, ...]

    @property
    def line(self) -> str:
        """Major line: data written by 2.x cannot be read by 3.x and vice versa."""
        return self.version.split(".", 1)[0]

    def jar(self, home: Path) -> Path:
        return home / self.jar_name


PREFERRED = RegistryRelease(APICURIO_VERSION, 21, "quarkus-run.jar", ("kafkasql", "h2"))
FALLBACK = RegistryRelease(
    APICURIO_FALLBACK_VERSION,
    17,
    f"apicurio-registry-app-{APICURIO_FALLBACK_VERSION}-runner.jar",
    ("h2",),
)


def release_for_java(major: int) -> RegistryRelease:
    if major >= PREFERRED.min_java:
        return PREFERRED
    if major >= FALLBACK.min_java:
        return FALLBACK
    raise StackError(
        f"the registry needs Java >= {FALLBACK.min_java} (>= {PREFERRED.min_java} for "
        f"Apicurio {PREFERRED.version}); found Java {major}. Install a JDK 21+ and set "
        "CDP_STACK_REGISTRY_JAVA=/path/to/bin/java."
    )


def resolve_storage(release: RegistryRelease, setting: str) -> Storage:
    if setting == "auto":
        return release.storages[0]
    if setting not in release.storages:
        raise StackError(
            f"Apicurio {release.version} cannot use {setting!r} storage (it supports "
            f"{', '.join(release.storages)}); unset CDP_STACK_REGISTRY_STORAGE or use Java >= 21."
        )
    return "kafkasql" if setting == "kafkasql" else "h2"


def data_label(release: RegistryRelease, storage: Storage) -> str:
    """What wrote the registry data, stored beside it to refuse incompatible restarts."""
    return f"apicurio-{release.line}.x/{storage}"


def registry_url(settings: StackSettings) -> str:
    return f"http://{HOST}:{settings.registry_port}{CCOMPAT_PATH}"


def _h2_url(paths: StackPaths) -> str:
    return f"jdbc:h2:file:{paths.registry_data / 'h2' / 'registry'}"


#: Start-up speed over peak throughput: a dev registry serves a handful of
#: lookups. Measured on 3.3.3 / Java 25: C1-only JIT cuts start-up CPU from
#: ~16 s to ~9 s (AppCDS, added by the manager, brings restarts to ~5 s).
JVM_FLAGS = ("-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC")


def command(
    java: Path,
    home: Path,
    release: RegistryRelease,
    storage: Storage,
    settings: StackSettings,
    paths: StackPaths,
    jvm_flags: Sequence[str] = (),
) -> list[str]:
    props: dict[str, str] = {
        # Quarkus binds 0.0.0.0 in prod mode; a dev registry has no auth.
        "quarkus.http.host": HOST,
        "quarkus.http.port": str(settings.registry_port),
    }
    if release is PREFERRED:
        props |= {
            "quarkus.management.host": HOST,
            "quarkus.management.port": str(settings.registry_mgmt_port),
            "apicurio.storage.snapshot.location": str(paths.registry_data / "snapshots"),
            # Dev stack: tests and developers must be able to delete subjects.
            "apicurio.rest.deletion.group.enabled": "true",
            "apicurio.rest.deletion.artifact.enabled": "true",
            "apicurio.rest.deletion.artifact-version.enabled": "true",
        }
        if storage == "kafkasql":
            props |= {
                "apicurio.storage.kind": "kafkasql",
                "apicurio.kafkasql.bootstrap.servers": f"{HOST}:{settings.kafka_port}",
                "apicurio.kafkasql.consumer.group-prefix": "cdpflow-stack-registry-",
                # Start-up polls the snapshots topic twice with this timeout
                # (default 5 s: +10 s per start). Safe to shorten only because
                # snapshots are off, so that topic stays empty: a snapshot
                # missed by a short poll would hide every schema journaled
                # before it.
                "apicurio.kafkasql.snapshot.scheduled.enabled": "false",
                "apicurio.kafkasql.consumer.poll.timeout": "1000",
            }
        else:
            props |= {
                "apicurio.storage.kind": "sql",
                "apicurio.storage.sql.kind": "h2",
                "apicurio.datasource.url": _h2_url(paths),
            }
    else:
        # 2.x sets these under the %prod profile; an explicit %prod system
        # property is the one source that reliably outranks them.
        props |= {
            "%prod.quarkus.http.host": HOST,
            "%prod.quarkus.http.port": str(settings.registry_port),
            "%prod.quarkus.datasource.jdbc.url": _h2_url(paths),
            "quarkus.datasource.jdbc.url": _h2_url(paths),
            "registry.rest.artifact.deletion.enabled": "true",
        }
    return [
        str(java),
        paths.owner_marker,
        f"-Xmx{settings.registry_heap}",
        *JVM_FLAGS,
        *jvm_flags,
        "-Djava.awt.headless=true",
        *(f"-D{k}={v}" for k, v in props.items()),
        "-jar",
        str(release.jar(home)),
    ]


def is_answering(url: str, timeout_s: float = 2.0) -> bool:
    """True once the ccompat API serves requests, i.e. serializers can register schemas."""
    try:
        # trust_env=False: an HTTP(S)_PROXY from the shell must not capture 127.0.0.1.
        resp = httpx.get(f"{url}/subjects", timeout=timeout_s, trust_env=False)
    except httpx.HTTPError:
        return False
    return resp.status_code == 200
