"""The sandbox's configuration, its counters, and the fault knobs tests turn."""

from __future__ import annotations

import bisect
import math
import ssl
from collections.abc import Callable
from datetime import datetime

import attrs

from ..exceptions import ConfigurationError
from ..reports import DEFAULT_WORKFLOW_STATES_TYPE

__all__ = ["SandboxConfig", "SandboxStats", "FileRequest", "Faults", "Rule"]


def _bandwidth(_: object, attribute: attrs.Attribute[float | None], value: object) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise ConfigurationError(
            f"SandboxConfig.{attribute.name} must be a positive number of bytes per second"
        )


@attrs.define
class SandboxConfig:
    """How the sandbox behaves. Ports 0 pick free ports; see `config_for_port` for the CLI."""

    max_requests: int = 100
    """Rate limit: at most this many counted requests per token ..."""
    window: float = 300.0
    """... in any sliding span of this many seconds (on arrival)."""
    tokens: frozenset[str] | None = None
    """Valid API tokens; None accepts any non-empty token."""
    export_pending_seconds: float = 0.5
    """How long an export job stays "pending" after it is started."""
    export_rows: int | None = None
    """None: an export has one row per case / message / NPS submission of the token's world
    in its range. A number: padding for tests and benchmarks: exactly that many rows, the
    world's rows repeated with fresh ids (or cut short) ..."""
    export_size_bytes: int | None = None
    """... or padding to an exact file size in bytes (overrides ``export_rows``): the world's
    rows repeated, the last one's free text filled with ``x``."""
    daily_volume: int = 24
    """Messages each token's world receives on an average weekday (60 % at weekends)."""
    latency: float = 0.0
    """Seconds added before answering each API/status request."""
    host: str = "127.0.0.1"
    api_port: int = 0
    status_port: int = 0
    files_port: int = 0
    ssl: ssl.SSLContext | None = None
    """A server-side TLS context: all three origins serve https (tests of CAs, proxies)."""
    now: Callable[[], datetime] | None = None
    """Wall clock for the "future date" rule and the world's present (nothing exists after
    it); default ``datetime.now(timezone.utc)``."""
    clock: Callable[[], float] | None = None
    """Monotonic clock for the rate window; default the running loop's ``time()``."""
    workflow_states_type: str = DEFAULT_WORKFLOW_STATES_TYPE
    """The report type name that answers workflow-state totals (unpublished: the reference's
    example uses Team Volume's ``user_volume``)."""
    file_bandwidth: float | None = attrs.field(default=None, validator=_bandwidth)
    """Bytes per second the file host sends on each connection (None: as fast as it can),
    as object stores and long links cap a single stream; parallel ranges add up."""


@attrs.frozen
class FileRequest:
    """One request to the file host: the file's path (``/files/<url id>/<name>``), its
    ``Range`` header (None: the whole file) and the client's (host, port), which tells
    its connections apart."""

    path: str
    range: str | None
    peer: tuple[object, ...] | None


@attrs.define
class SandboxStats:
    """What the sandbox saw. Tokens appear only as `limits.token_key` hashes.

    ``requests[key]`` counts the requests that counted toward the rate limit (every request
    with a valid token that was not itself answered 429), so it equals
    ``len(arrivals[key])``; the 429s are in ``rate_limited_by_token``.
    """

    requests: dict[str, int] = attrs.Factory(dict)
    arrivals: dict[str, list[float]] = attrs.Factory(dict)
    paths: dict[str, list[str]] = attrs.Factory(dict)
    """The path of each arrival: ``paths[key][i]`` is the request of ``arrivals[key][i]``."""
    rate_limited: int = 0
    rate_limited_by_token: dict[str, int] = attrs.Factory(dict)
    unauthorized: int = 0
    leaks: int = 0
    file_requests: int = 0
    file_log: list[FileRequest] = attrs.Factory(list)
    """Every request to the file host for an export file, in arrival order."""
    bytes_served: int = 0
    exports_started: int = 0
    status_polls: dict[str, int] = attrs.Factory(dict)
    errors_injected: int = 0
    in_progress: int = 0
    """Requests being handled right now, on all three origins."""
    max_in_progress: int = 0
    """The most requests ever handled at once (a client's concurrency cap shows here)."""
    peers: set[tuple[object, ...]] = attrs.Factory(set)
    """Client addresses (host, port) seen by the API and status hosts."""

    @property
    def connections(self) -> int:
        """Client connections seen by the API and status hosts."""
        return len(self.peers)

    def max_in_window(self, key: str, window: float) -> int:
        """The most arrivals of token ``key`` in any half-open span ``[t, t + window)``: the
        rate-limit invariant is ``max_in_window(key, W) <= N``."""
        times = sorted(self.arrivals.get(key, ()))
        best = 0
        for i, start in enumerate(times):
            best = max(best, bisect.bisect_left(times, start + window) - i)
        return best


@attrs.define
class Rule:
    """A pending one-shot fault: fires for the next ``remaining`` matching requests."""

    remaining: int
    path_contains: str | None = None
    status: int = 0
    retry_after: str | None = None
    body: bytes = b""


def _take(rules: list[Rule], path: str) -> Rule | None:
    for rule in rules:
        if rule.path_contains is None or rule.path_contains in path:
            rule.remaining -= 1
            if rule.remaining <= 0:
                rules.remove(rule)
            return rule
    return None


@attrs.define
class Faults:
    """Fault knobs. One-shot counters decrement as they fire.

    API/status faults (`fail_next`, `drop_next`, `malformed_next`) apply after auth and the
    rate limit, so the failed request still counts as an arrival. File-host knobs:
    ``drop_download_after`` bytes then cut, ``drop_download_count`` times (set
    ``drop_download_after`` alone to cut once); ``download_cuts``: the next file requests
    are cut after these many bytes each, in turn (before ``drop_download_after`` applies);
    ``expire_urls`` next file requests get 410;
    ``ranges=False`` ignores Range. Export knobs: ``fail_jobs`` next started jobs end
    "failed"; ``never_complete`` keeps jobs "pending".
    """

    drop_download_after: int | None = None
    drop_download_count: int = 1
    download_cuts: list[int] = attrs.Factory(list)
    expire_urls: int = 0
    ranges: bool = True
    fail_jobs: int = 0
    never_complete: bool = False
    _fails: list[Rule] = attrs.field(factory=list, init=False, repr=False)
    _drops: list[Rule] = attrs.field(factory=list, init=False, repr=False)
    _malformed: list[Rule] = attrs.field(factory=list, init=False, repr=False)

    def fail_next(
        self,
        status: int,
        count: int = 1,
        *,
        retry_after: str | None = None,
        path_contains: str | None = None,
    ) -> None:
        """Answer the next ``count`` API/status requests (matching ``path_contains``) with
        ``status`` and a plausible body; ``retry_after`` sets a Retry-After header."""
        self._fails.append(Rule(count, path_contains, status, retry_after))

    def drop_next(self, count: int = 1, path_contains: str | None = None) -> None:
        """Close the connection of the next ``count`` API/status requests without answering."""
        self._drops.append(Rule(count, path_contains))

    def malformed_next(
        self,
        count: int = 1,
        body: bytes = b'{"unexpected": "shape"}',
        path_contains: str | None = None,
    ) -> None:
        """Answer the next ``count`` API/status requests 200 with ``body`` (wrong shape)."""
        self._malformed.append(Rule(count, path_contains, 200, body=body))

    def reset(self) -> None:
        """Clear every fault."""
        fresh = Faults()
        for field in attrs.fields(Faults):
            setattr(self, field.name, getattr(fresh, field.name))

    def take_drop(self, path: str) -> bool:
        return _take(self._drops, path) is not None

    def take_malformed(self, path: str) -> Rule | None:
        return _take(self._malformed, path)

    def take_fail(self, path: str) -> Rule | None:
        return _take(self._fails, path)

    def take_download_cut(self) -> int | None:
        """Bytes after which to cut this download, or None."""
        if self.download_cuts:
            return self.download_cuts.pop(0)
        if self.drop_download_after is None or self.drop_download_count <= 0:
            return None
        self.drop_download_count -= 1
        return self.drop_download_after

    def take_expire(self) -> bool:
        if self.expire_urls <= 0:
            return False
        self.expire_urls -= 1
        return True

    def take_job_failure(self) -> bool:
        if self.fail_jobs <= 0:
            return False
        self.fail_jobs -= 1
        return True
