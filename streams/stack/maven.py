"""Fetch the broker jars and the registry distribution from Maven Central, once.

Maven (not hand-written URLs) resolves the artifacts so that mirrors and
proxies configured in ``~/.m2/settings.xml`` keep working. Each artifact is
unpacked into its own versioned directory under the cache and marked complete
only after an atomic rename, so an interrupted download never looks usable and
a warm start never runs Maven at all. A file lock serialises concurrent first
runs (several test sessions may share one cache).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from streams.stack import (
    DEPENDENCY_PLUGIN,
    KAFKA_VERSION,
    LOG4J_VERSION,
    StackError,
)

Progress = Callable[[str], None]

_COMPLETE = ".complete"
_MAVEN_TIMEOUT_S = 1800

_KAFKA_POM = """\
<?xml version="1.0" encoding="UTF-8"?>
<!-- Written by streams/stack/maven.py: the broker's runtime classpath. Do not edit. -->
<project xmlns="http://maven.apache.org/POM/4.0.0"
         xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"
         xsi:schemaLocation="http://maven.apache.org/POM/4.0.0
                             https://maven.apache.org/xsd/maven-4.0.0.xsd">
  <modelVersion>4.0.0</modelVersion>
  <groupId>dev.cdpflow.stack</groupId>
  <artifactId>kafka-runtime</artifactId>
  <version>{kafka}</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_2.13</artifactId>
      <version>{kafka}</version>
    </dependency>
    <!-- The published kafka_2.13 POM has no logging backend (only the release tarball does). -->
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-api</artifactId>
      <version>{log4j}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-core</artifactId>
      <version>{log4j}</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-slf4j-impl</artifactId>
      <version>{log4j}</version>
    </dependency>
  </dependencies>
</project>
"""


def _noop(_: str) -> None:
    return None


@contextmanager
def _locked(cache: Path) -> Iterator[None]:
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / ".download.lock").open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _mvn() -> str:
    mvn = shutil.which("mvn")
    if mvn is None:
        raise StackError(
            "Maven ('mvn') is not on PATH; it downloads Kafka and the registry once. "
            "Install it (e.g. `apt-get install maven`) or point CDP_STACK_CACHE_DIR at a filled "
            "cache."
        )
    return mvn


def _run_maven(args: list[str], cwd: Path, what: str) -> None:
    cmd = [_mvn(), "-q", "-B", *args]
    try:
        proc = subprocess.run(
            cmd,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=_MAVEN_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise StackError(f"Maven took over {_MAVEN_TIMEOUT_S}s to fetch {what}; retry.") from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
        raise StackError(
            f"Maven could not fetch {what} (exit {proc.returncode}). It needs Maven Central "
            f"(or a mirror in ~/.m2/settings.xml). Last output:\n{tail}"
        )


def _is_complete(path: Path) -> bool:
    return (path / _COMPLETE).is_file()


def _mark_complete(path: Path) -> None:
    (path / _COMPLETE).write_text(time.strftime("%Y-%m-%dT%H:%M:%S%z\n"))


def kafka_dir(cache: Path) -> Path:
    return cache / f"kafka-{KAFKA_VERSION}"


def registry_dir(cache: Path, version: str) -> Path:
    return cache / f"apicurio-{version}"


def is_kafka_cached(cache: Path) -> bool:
    return _is_complete(kafka_dir(cache))


def is_registry_cached(cache: Path, version: str) -> bool:
    return _is_complete(registry_dir(cache, version))


def ensure_kafka_lib(cache: Path, progress: Progress = _noop) -> Path:
    """The broker classpath directory (``.../kafka-<ver>/lib``), downloading it if needed."""
    home = kafka_dir(cache)
    lib = home / "lib"
    if _is_complete(home):
        return lib
    with _locked(cache):
        if _is_complete(home):  # another process finished while we waited
            return lib
        progress(f"downloading Kafka {KAFKA_VERSION} jars with Maven (first run only)...")
        home.mkdir(parents=True, exist_ok=True)
        (home / "pom.xml").write_text(_KAFKA_POM.format(kafka=KAFKA_VERSION, log4j=LOG4J_VERSION))
        partial = home / "lib.partial"
        shutil.rmtree(partial, ignore_errors=True)
        shutil.rmtree(lib, ignore_errors=True)
        _run_maven(
            [
                "-f",
                "pom.xml",
                f"{DEPENDENCY_PLUGIN}:copy-dependencies",
                "-DincludeScope=runtime",
                f"-DoutputDirectory={partial}",
            ],
            cwd=home,
            what=f"Kafka {KAFKA_VERSION}",
        )
        if not any(partial.glob("kafka_2.13-*.jar")):
            raise StackError(f"Maven finished but {partial} has no kafka_2.13 jar; delete {home}")
        partial.rename(lib)
        _mark_complete(home)
        return lib


def ensure_registry(cache: Path, version: str, progress: Progress = _noop) -> Path:
    """The unpacked Apicurio distribution for ``version``, downloading it if needed."""
    home = registry_dir(cache, version)
    if _is_complete(home):
        return home
    with _locked(cache):
        if _is_complete(home):
            return home
        progress(f"downloading Apicurio Registry {version} (~150 MB, first run only)...")
        downloads = cache / "downloads"
        shutil.rmtree(downloads, ignore_errors=True)
        downloads.mkdir(parents=True)
        # Copied as a single artifact: declaring it as a dependency would pull
        # the whole Quarkus tree and the parent POM's extra repositories.
        _run_maven(
            [
                f"{DEPENDENCY_PLUGIN}:copy",
                f"-Dartifact=io.apicurio:apicurio-registry-app:{version}:tar.gz:all",
                f"-DoutputDirectory={downloads}",
            ],
            cwd=downloads,
            what=f"Apicurio Registry {version}",
        )
        tarballs = list(downloads.glob("*.tar.gz"))
        if len(tarballs) != 1:
            raise StackError(f"expected one registry tarball in {downloads}, found {tarballs}")
        progress(f"unpacking Apicurio Registry {version}...")
        partial = cache / f"apicurio-{version}.partial-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        with tarfile.open(tarballs[0]) as tar:
            tar.extractall(partial, filter="data")
        shutil.rmtree(home, ignore_errors=True)
        partial.rename(home)
        # ~/.m2 keeps a copy; a second 150 MB in the cache buys nothing.
        shutil.rmtree(downloads, ignore_errors=True)
        _mark_complete(home)
        return home
