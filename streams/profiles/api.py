"""Read-only profile lookups served by the worker from its Faust tables.

``GET /profiles/{id}`` and ``GET /profiles/{id}/recommendations`` answer for a
stitched profile under any of its ids: the userId, ``anon:<anonymousId>`` or a
bare anonymousId (or an alias's previousId). Both need ``Authorization: Bearer
<CDP_PROFILE_API_TOKEN>``: 401 without or with a wrong token, 503 while no
token is configured (fail closed), 404 for an id no table knows.

Why this is more than a ``table[key]``: the tables are partitioned. A worker
only holds its own partitions, and one lookup touches two keys that may live on
different workers: ``identity_links`` is keyed by anonymousId, the profile
tables by canonical profile id. So each read goes to the key's owner: a local
``get`` when this worker owns the partition, else one proxied
``GET /internal/profiles/<table>/<key>`` to the owner's web server. The owner
comes from Faust's ``app.router.table_metadata`` (the assignor's active
changelog partitions per worker). ``app.router.key_store`` and
``app.table_route`` are not used: they hash the table's *JSON-serialized* key,
while cdpflow's tables are filled from topics partitioned by the raw UTF-8 key,
so they name the wrong worker for most keys (see :meth:`ProfileApi.owner`).
``table_route`` also routes a whole request by a single key and forwards without a
hop limit; here a request fans out to several keys, and a hop header stops two
workers that disagree during a rebalance from bouncing a request between them
(503 + Retry-After instead).

"All ids of a profile" needs the reverse of ``identity_links`` (userId ->
anonymousIds), which no table keeps. Each worker scans the links it holds
(active and standby partitions, O(links held)) and the answer is the union over
the workers in the assignment. Pass ``?aliases=false`` to skip that scan.

Workers reach each other at their Faust ``canonical_url``: ``http://<web_host>:
<web_port>``, 127.0.0.1 in cdpflow's app, which only works for workers on one
host. Workers on several hosts need a routable ``web_host``/``canonical_url``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Final

import aiohttp
from aiokafka.partitioner import murmur2
from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from yarl import URL

from streams.identity.agents import ANON_PREFIX
from streams.pipeline import Pipeline
from streams.settings import reject_unknown_env

log = logging.getLogger(__name__)

ENV_PREFIX: Final = "CDP_PROFILE_API_"
HOPS_HEADER: Final = "X-Cdpflow-Hops"
#: A request is forwarded at most this often: owner lookup, then once more if the
#: partition moved in between. More means the workers disagree (rebalance).
MAX_HOPS: Final = 2
RETRY_AFTER_S: Final = "2"
INTERNAL_PREFIX: Final = "/internal/profiles"

Handler = Callable[..., Awaitable[Any]]


class ProfileApiSettings(BaseSettings):
    """``CDP_PROFILE_API_*``: the worker's token, and where the CLI finds a worker."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, case_sensitive=False, extra="ignore")

    token: SecretStr = Field(
        SecretStr(""), description="Bearer token for /profiles; empty = API answers 503."
    )
    url: str | None = Field(
        None, description="A worker's web URL for `cdpflow profile` (e.g. http://127.0.0.1:6066)."
    )
    timeout_s: float = Field(5.0, gt=0, le=120, description="Per proxied call between workers.")

    @model_validator(mode="after")
    def _no_unknown_env(self) -> ProfileApiSettings:
        reject_unknown_env(ENV_PREFIX, [ENV_PREFIX + f for f in type(self).model_fields])
        return self


class _Unavailable(Exception):
    """No owner known for a key right now (rebalance), or the owner did not answer."""


def _ident(url: URL) -> tuple[str, int]:
    """(host, port) as Faust's router compares them to tell "this node"."""
    return (url.host if url.scheme else url.path) or "", int(url.port or 80)


def _iso(ms: Any) -> str | None:
    if not isinstance(ms, int):
        return None
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


def _recommendations(state: Mapping[str, Any] | None) -> dict[str, Any]:
    if not state:
        return {"products": [], "modelVersion": None, "generatedAt": None, "updateId": None}
    return {
        "products": list(state.get("products") or []),
        "modelVersion": state.get("modelVersion"),
        "generatedAt": _iso(state.get("generatedAt")),
        "updateId": state.get("updateId"),
    }


class ProfileApi:
    """The lookups, independent of how views are declared (kept testable)."""

    def __init__(self, pipeline: Pipeline, settings: ProfileApiSettings) -> None:
        self.app = pipeline.app
        self.settings = settings
        self.tables: dict[str, Any] = {
            t.name: t
            for t in (
                pipeline.identity_links,
                pipeline.profile_traits,
                pipeline.profile_recommendations,
            )
        }
        self.links_name = pipeline.identity_links.name
        self.traits_name = pipeline.profile_traits.name
        self.recs_name = pipeline.profile_recommendations.name
        self._token = settings.token.get_secret_value().encode()
        if not self._token and self.app.conf.web_enabled:
            log.warning("CDP_PROFILE_API_TOKEN is empty: /profiles answers 503 until it is set")

    # -- access control --

    def refusal(self, view: Any, request: Any) -> Any | None:
        """The error response for a request without the right token, else None."""
        if not self._token:
            return view.json(
                {"error": "profile API disabled: CDP_PROFILE_API_TOKEN is not set"}, status=503
            )
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), self._token
        ):
            return view.json(
                {"error": "missing or invalid bearer token"},
                status=401,
                headers={"WWW-Authenticate": 'Bearer realm="cdpflow"'},
            )
        return None

    # -- ownership --

    def owner(self, table_name: str, key: str) -> URL | None:
        """The web URL of the worker owning ``key``'s partition; None when it is this one.

        Not ``app.router.key_store``: it hashes the table's *serialized* key (JSON,
        ``b'"anon-1"'``, for these tables), but cdpflow's tables are filled from
        topics partitioned by the raw UTF-8 key, the way every cdpflow producer
        (murmur2, as Java clients) partitions. So the partition is computed that
        way, and its owner read from ``app.router.table_metadata`` (the
        assignor's map of active changelog partitions per worker).
        """
        topic = self.tables[table_name].changelog_topic
        name = topic.get_topic_name()
        count = int(topic.partitions or self.app.conf.topic_partitions)
        partition = (murmur2(key.encode()) & 0x7FFFFFFF) % count
        for url, assigned in self.app.router.table_metadata(table_name).items():
            if partition in assigned.get(name, ()):
                owner = URL(str(url))
                if _ident(owner) == _ident(URL(str(self.app.conf.canonical_url))):
                    return None
                return owner
        raise _Unavailable(f"no worker owns {table_name} partition {partition} yet (rebalancing)")

    # -- reads --

    async def read(self, table_name: str, key: str, request: Any) -> tuple[Any, str]:
        """``table[key]`` from whichever worker owns it, and that worker's URL."""
        owner = self.owner(table_name, key)
        if owner is None:
            return self.tables[table_name].get(key), str(self.app.conf.canonical_url)
        body = await self._call(owner, f"{INTERNAL_PREFIX}/{table_name}/{key}", request, 1)
        return body.get("value"), str(body.get("servedBy") or owner)

    async def _call(self, owner: URL, path: str, request: Any, hops: int) -> dict[str, Any]:
        headers = {
            "Authorization": request.headers.get("Authorization", ""),
            HOPS_HEADER: str(hops),
        }
        url = owner.with_path(path, encoded=False)
        timeout = aiohttp.ClientTimeout(total=self.settings.timeout_s)
        try:
            async with self.app.http_client.get(url, headers=headers, timeout=timeout) as resp:
                if resp.status != 200:
                    raise _Unavailable(f"{owner} answered {resp.status} for {path}")
                body = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _Unavailable(f"{owner} unreachable: {exc}") from exc
        if not isinstance(body, dict):
            raise _Unavailable(f"{owner} answered an unexpected body for {path}")
        return body

    async def internal_read(self, view: Any, request: Any, table_name: str, key: str) -> Any:
        """Serve a key this worker owns; forward once if ownership moved meanwhile."""
        if table_name not in self.tables:
            return view.json({"error": f"unknown table {table_name}"}, status=404)
        owner = self.owner(table_name, key)
        if owner is None:
            value = self.tables[table_name].get(key)
            served_by = str(self.app.conf.canonical_url)
            return view.json(
                {"table": table_name, "key": key, "value": value, "servedBy": served_by}
            )
        hops_text = request.headers.get(HOPS_HEADER, "0")
        hops = int(hops_text) if hops_text.isdigit() else MAX_HOPS
        if hops >= MAX_HOPS:
            raise _Unavailable(f"{table_name}[{key!r}] bounced between workers (rebalancing)")
        path = f"{INTERNAL_PREFIX}/{table_name}/{key}"
        return view.json(await self._call(owner, path, request, hops + 1))

    def local_aliases(self, user_id: str) -> list[str]:
        """Links held here (active and standby partitions) that point at ``user_id``."""
        return sorted(k for k, v in self.tables[self.links_name].items() if v == user_id)

    async def aliases(self, user_id: str, request: Any) -> list[str]:
        """Every id linked to ``user_id``: the union over all workers' local links."""
        me = _ident(URL(str(self.app.conf.canonical_url)))
        hosts = {URL(str(u)) for u in self.app.router.tables_metadata()}
        found = set(self.local_aliases(user_id))
        others = [h for h in hosts if _ident(h) != me]
        path = f"{INTERNAL_PREFIX}/aliases/{user_id}"
        results = await asyncio.gather(
            *(self._call(h, path, request, MAX_HOPS) for h in others), return_exceptions=True
        )
        for host, result in zip(others, results, strict=True):
            if isinstance(result, BaseException):
                raise _Unavailable(f"{host} did not list its links: {result}")
            found.update(str(a) for a in result.get("aliases", []))
        return sorted(found)

    # -- the public lookups --

    async def resolve(self, requested: str, request: Any) -> dict[str, Any] | None:
        """Canonical id, how it was found, traits and recommendations; None if unknown."""
        anon = requested[len(ANON_PREFIX) :] if requested.startswith(ANON_PREFIX) else requested
        read_from: dict[str, str] = {}
        linked = None
        if anon:
            linked, read_from[self.links_name] = await self.read(self.links_name, anon, request)
        if linked:
            candidates = [str(linked)]
        elif requested.startswith(ANON_PREFIX):
            candidates = [requested]
        else:  # a userId, or a bare anonymousId that was never linked
            candidates = [requested, ANON_PREFIX + requested]
        for profile_id in candidates:
            (
                (traits, read_from[self.traits_name]),
                (recs, read_from[self.recs_name]),
            ) = await asyncio.gather(
                self.read(self.traits_name, profile_id, request),
                self.read(self.recs_name, profile_id, request),
            )
            if linked or traits is not None or recs is not None:
                return {
                    "profileId": profile_id,
                    "requestedId": requested,
                    "resolvedVia": "identity_links" if linked else "profile id",
                    "linkedAnonymousId": anon if linked else None,
                    "traits": traits or {},
                    "recommendations": recs,
                    "readFrom": read_from,
                }
        return None

    async def profile(self, view: Any, request: Any, profile_id: str) -> Any:
        found = await self.resolve(profile_id, request)
        if found is None:
            return view.json({"error": f"unknown profile {profile_id!r}"}, status=404)
        pid = found["profileId"]
        is_user = not pid.startswith(ANON_PREFIX)
        anonymous: set[str] = set()
        if found["linkedAnonymousId"]:
            anonymous.add(found["linkedAnonymousId"])
        if not is_user:
            anonymous.add(pid[len(ANON_PREFIX) :])
        elif request.query.get("aliases", "true").lower() not in ("0", "false", "no"):
            anonymous.update(await self.aliases(pid, request))
        anonymous.discard(pid)
        return view.json(
            {
                "profileId": pid,
                "requestedId": found["requestedId"],
                "resolvedVia": found["resolvedVia"],
                "identities": {
                    "userId": pid if is_user else None,
                    "anonymousIds": sorted(anonymous),
                },
                "traits": found["traits"],
                "recommendations": _recommendations(found["recommendations"]),
                "servedBy": str(self.app.conf.canonical_url),
                # Which worker answered each table read (the owner of that key's partition).
                "readFrom": found["readFrom"],
            }
        )

    async def recommendations(self, view: Any, request: Any, profile_id: str) -> Any:
        found = await self.resolve(profile_id, request)
        if found is None:
            return view.json({"error": f"unknown profile {profile_id!r}"}, status=404)
        return view.json(
            {
                "profileId": found["profileId"],
                "requestedId": found["requestedId"],
                **_recommendations(found["recommendations"]),
            }
        )


def _guarded(api: ProfileApi, handler: Handler) -> Handler:
    """Token check first; a missing owner becomes 503 + Retry-After, not a 500."""

    async def get(view: Any, request: Any, **match: str) -> Any:
        refused = api.refusal(view, request)
        if refused is not None:
            return refused
        try:
            return await handler(view, request, **match)
        except _Unavailable as exc:
            log.warning("profile lookup unavailable: %s", exc)
            return view.json(
                {"error": str(exc)}, status=503, headers={"Retry-After": RETRY_AFTER_S}
            )

    get.__name__ = handler.__name__
    get.__doc__ = handler.__doc__
    return get


def register_profile_api(
    pipeline: Pipeline, settings: ProfileApiSettings | None = None
) -> ProfileApi:
    """Add the profile views to the pipeline's Faust app (served when its web server runs)."""
    api = ProfileApi(pipeline, settings or ProfileApiSettings())
    app = pipeline.app

    async def profile(view: Any, request: Any, profile_id: str) -> Any:
        """A profile's identities, traits and current recommendations."""
        return await api.profile(view, request, profile_id)

    async def profile_recommendations(view: Any, request: Any, profile_id: str) -> Any:
        """A profile's current recommendation list."""
        return await api.recommendations(view, request, profile_id)

    async def internal_read(view: Any, request: Any, table: str, key: str) -> Any:
        """One table key from its owner (worker to worker)."""
        return await api.internal_read(view, request, table, key)

    async def internal_aliases(view: Any, request: Any, user_id: str) -> Any:
        """The links this worker holds for a userId (worker to worker)."""
        return view.json({"userId": user_id, "aliases": api.local_aliases(user_id)})

    app.page("/profiles/{profile_id}", name="cdpflow-profile")(_guarded(api, profile))
    app.page("/profiles/{profile_id}/recommendations", name="cdpflow-profile-recommendations")(
        _guarded(api, profile_recommendations)
    )
    app.page(f"{INTERNAL_PREFIX}/aliases/{{user_id}}", name="cdpflow-profile-aliases")(
        _guarded(api, internal_aliases)
    )
    app.page(f"{INTERNAL_PREFIX}/{{table}}/{{key}}", name="cdpflow-profile-table-read")(
        _guarded(api, internal_read)
    )
    return api


__all__ = ["ProfileApi", "ProfileApiSettings", "register_profile_api"]
