"""The Faust application: one app per consumer group, configured from Settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import faust

from streams.settings import Settings

#: Faust table names (their changelog topics are ``<app id>-<name>-changelog``).
IDENTITY_LINKS_TABLE = "identity_links"
PROFILE_TRAITS_TABLE = "profile_traits"
PROFILE_RECOMMENDATIONS_TABLE = "profile_recommendations"


def faust_broker_url(bootstrap_servers: str) -> str:
    """Faust wants ``kafka://h1:p;kafka://h2:p`` where Kafka clients take ``h1:p,h2:p``."""
    hosts = [h.strip() for h in bootstrap_servers.split(",") if h.strip()]
    return ";".join(f"kafka://{h}" for h in hosts)


def create_app(settings: Settings, *, web_enabled: bool = True, **overrides: Any) -> faust.App:
    datadir = Path(settings.cdp_worker_data_dir)
    conf: dict[str, Any] = {
        "broker": faust_broker_url(settings.kafka_bootstrap_servers),
        "store": "memory://",
        "topic_partitions": settings.cdp_topic_partitions,
        "topic_replication_factor": settings.cdp_topic_replication,
        "topic_allow_declare": True,
        "producer_acks": -1,
        "producer_linger_ms": 5,
        "producer_compression_type": "lz4",
        "consumer_auto_offset_reset": "earliest",
        "broker_commit_every": 10_000,
        "broker_commit_interval": 1.0,
        "stream_buffer_maxsize": 8192,
        "table_standby_replicas": 1,
        "broker_session_timeout": settings.cdp_worker_session_timeout_s,
        "broker_heartbeat_interval": max(1.0, settings.cdp_worker_session_timeout_s / 10),
        "web_enabled": web_enabled,
        "web_port": settings.cdp_worker_web_port,
        "web_host": "127.0.0.1",
        "web_bind": settings.cdp_worker_web_bind,
        "datadir": str(datadir),
        "logging_config": None,
    }
    if settings.kafka_security_protocol != "PLAINTEXT":
        conf["broker_credentials"] = _faust_credentials(settings)
    conf.update(overrides)
    return faust.App(settings.cdp_worker_id, **conf)


def _faust_credentials(settings: Settings) -> Any:
    import ssl

    context = None
    if "SSL" in settings.kafka_security_protocol:
        context = ssl.create_default_context(cafile=settings.kafka_ssl_cafile)
    if settings.kafka_sasl_mechanism:
        password = (
            settings.kafka_sasl_password.get_secret_value() if settings.kafka_sasl_password else ""
        )
        return faust.SASLCredentials(
            username=settings.kafka_sasl_username or "",
            password=password,
            mechanism=settings.kafka_sasl_mechanism,
            ssl_context=context,
        )
    return faust.SSLCredentials(context)
