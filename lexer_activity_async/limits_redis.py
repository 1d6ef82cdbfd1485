"""A Redis-backed sliding-window limiter, shared by every process that uses one token.

Same guarantee as `SlidingWindowLimiter`: the server never sees more than ``max_requests``
requests of a token in any ``window``-second span, because each request holds a slot from
before it is sent until ``window`` seconds after its response completed. Here the slots
live in Redis, so the guarantee holds across processes and hosts.

State, per token (``{prefix}{<token key>}:leases`` and ``...:blocked``; the token key is
`token_key`'s hash, never the token; the braces are a Redis Cluster hash tag):

* ``leases``: a sorted set of lease ids scored by the Redis-server time (microseconds) at
  which the slot frees. A lease is granted with score ``now + lease_timeout + window``; its
  release rescores it to ``now + window``. A slot whose holder died is therefore freed
  ``lease_timeout + window`` after it was granted, never earlier.
* ``blocked``: the time until which a 429 penalty blocks every acquisition.

A bulk acquisition's lease id starts with ``b:``; bulk is granted only while fewer than
``max_requests - reserve`` such leases are held (and fewer than ``max_requests`` in all),
so the reserve stays free for interactive calls of every process.

All logic runs in Lua scripts (atomic, EVALSHA) and reads the clock with
``redis.call('TIME')``, so the hosts' clocks do not matter. Every write sets the key's
expiry to its latest score, so idle keys vanish by themselves.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import math
import uuid
import weakref
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import anyio
import attrs

from .exceptions import ConfigurationError, LimiterBackendError
from .limits import (
    DEFAULT_MAX_REQUESTS,
    DEFAULT_WINDOW,
    PRIORITIES,
    Lease,
    LimiterFactory,
    LimiterRegistry,
    LimiterStats,
    Priority,
    WaitCallback,
    _SlotMixin,
    check_limit,
    wait_behind,
)

if TYPE_CHECKING:
    from types import ModuleType

    from redis.asyncio import Redis
    from redis.commands.core import AsyncScript

__all__ = [
    "DEFAULT_LEASE_TIMEOUT",
    "DEFAULT_PREFIX",
    "RedisLimiter",
    "redis_limiter_factory",
    "check_redis",
    "shared_registry",
]

DEFAULT_LEASE_TIMEOUT = 60.0
"""Seconds a granted slot may stay unreleased (the client's request timeout)."""

DEFAULT_PREFIX = "lexer:limit:"

_INSTALL_HINT = "pip install 'lexer-activity-async[redis]'"

T = TypeVar("T")

# Shared preamble: server time in microseconds. Numbers are written back with '%.0f'
# because Redis formats Lua numbers with too few digits for microsecond timestamps.
_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local function int(x) return string.format('%.0f', x) end
local function expire_at_last(key)
  local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  if last[2] then
    redis.call('PEXPIRE', key, math.max(1, math.ceil((tonumber(last[2]) - now) / 1000) + 1))
  end
end
"""

# Bulk leases (ids starting "b:") with their scores, ascending, and the offset from now
# at which fewer than `cap` of them are held (0 if already).
_BULK = """
local function bulk_leases(key)
  local all = redis.call('ZRANGE', key, 0, -1, 'WITHSCORES')
  local scores = {}
  for i = 1, #all, 2 do
    if string.sub(all[i], 1, 2) == 'b:' then scores[#scores + 1] = tonumber(all[i + 1]) end
  end
  return scores
end
"""

_ACQUIRE = (
    _NOW
    + _BULK
    + """
-- KEYS: leases, blocked. ARGV: max_requests, hold_us (lease_timeout + window), lease id,
-- window_us, bulk_max (max_requests - reserve; -1 for interactive). Returns {1, now_us}
-- when granted, else {0, now_us, held, blocked_us, full_us, free_us...}: the leases held
-- (bulk ones, for bulk), how long a 429 still blocks, how long until a slot frees for
-- this priority (0 if one is free), and when the released slots free (ascending;
-- offsets from now; bulk ones, for bulk).
local max = tonumber(ARGV[1])
local bulk_max = tonumber(ARGV[5] or '-1')
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local blocked = math.max(0, tonumber(redis.call('GET', KEYS[2]) or '0') - now)
local n = redis.call('ZCARD', KEYS[1])
local bulk = {}
if bulk_max >= 0 then bulk = bulk_leases(KEYS[1]) end
if blocked == 0 and n < max and (bulk_max < 0 or #bulk < bulk_max) then
  redis.call('ZADD', KEYS[1], int(now + tonumber(ARGV[2])), ARGV[3])
  expire_at_last(KEYS[1])
  return {1, int(now)}
end
local full = 0
if n >= max then
  -- a late release may have pushed it over max: a slot frees when the (n - max + 1)-th
  -- earliest lease does
  local nth = redis.call('ZRANGE', KEYS[1], n - max, n - max, 'WITHSCORES')
  full = tonumber(nth[2]) - now
end
local window_end = now + tonumber(ARGV[4])
if bulk_max >= 0 then
  if #bulk >= bulk_max then full = math.max(full, bulk[#bulk - bulk_max + 1] - now) end
  local reply = {0, int(now), #bulk, int(blocked), int(full)}
  for i = 1, math.min(#bulk, max) do
    if bulk[i] > now and bulk[i] <= window_end then reply[#reply + 1] = int(bulk[i] - now) end
  end
  return reply
end
local reply = {0, int(now), n, int(blocked), int(full)}
local frees = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. int(now),
  int(window_end), 'WITHSCORES', 'LIMIT', 0, max)
for i = 2, #frees, 2 do
  reply[#reply + 1] = int(tonumber(frees[i]) - now)
end
return reply
"""
)

_RENEW = (
    _NOW
    + _BULK
    + """
-- KEYS: leases. ARGV: lease id, hold_us, max_requests, bulk_max (-1: interactive). The
-- request is about to be sent: its lease frees no earlier than a whole hold from now.
-- A lease that expired meanwhile is taken again if its priority still has room (a 429
-- penalty does not stop it: it was granted before). Returns 1, or 0 when it is lost.
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local frees = now + tonumber(ARGV[2])
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score then
  local bulk_max = tonumber(ARGV[4])
  if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
  if bulk_max >= 0 and #bulk_leases(KEYS[1]) >= bulk_max then return 0 end
elseif tonumber(score) >= frees then
  return 1
end
redis.call('ZADD', KEYS[1], int(frees), ARGV[1])
expire_at_last(KEYS[1])
return 1
"""
)

_RELEASE = (
    _NOW
    + """
-- KEYS: leases. ARGV: lease id, window_us. The slot frees a window from now: this lowers
-- an in-flight lease's score, or raises an overdue one's, or re-adds one that had
-- already expired (the request did reach the server, so it must count a window longer).
redis.call('ZADD', KEYS[1], int(now + tonumber(ARGV[2])), ARGV[1])
expire_at_last(KEYS[1])
return int(now)
"""
)

_FORGET = """
-- KEYS: leases. ARGV: lease id. A lease granted to a task cancelled before it could send
-- anything: it never reached the server, so it takes no slot.
return redis.call('ZREM', KEYS[1], ARGV[1])
"""

_PENALIZE = (
    _NOW
    + """
-- KEYS: blocked. ARGV: hold_us. blocked_until = max(blocked_until, now + hold).
local hold = tonumber(ARGV[1])
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if now + hold > current then
  redis.call('SET', KEYS[1], int(now + hold), 'PX', math.max(1, math.ceil(hold / 1000) + 1))
end
return int(now)
"""
)


def _import_redis() -> ModuleType:
    """`redis.asyncio`, or a `LimiterBackendError` saying how to install it."""
    try:
        import redis.asyncio as redis_asyncio
    except ImportError as error:
        raise LimiterBackendError(
            f"the Redis limiter needs the 'redis' package: {_INSTALL_HINT}"
        ) from error
    return redis_asyncio


def redact_url(url: str) -> str:
    """``url`` with any password (userinfo or ``password=`` query) replaced by ``***``."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if parts.password is not None:
            user = parts.username or ""
            host = netloc.rpartition("@")[2]
            netloc = f"{user}:***@{host}"
        query = urlencode(
            [
                (k, "***" if k.lower() == "password" else v)
                for k, v in parse_qsl(parts.query, keep_blank_values=True)
            ],
            safe="*",
        )
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:
        return "<unparseable Redis URL>"


async def _uncancellable(work: Awaitable[T]) -> T:
    """Await ``work`` to completion even if this task is cancelled meanwhile (natively or
    by anyio), then re-raise the cancellation. Used for writes that must not be lost."""
    task = asyncio.ensure_future(work)
    cancelled: asyncio.CancelledError | None = None
    while not task.done():
        try:
            await asyncio.wait({task})  # unlike wait_for/shield chains, never cancels task
        except asyncio.CancelledError as error:
            cancelled = error
    if cancelled is not None:
        if not task.cancelled():
            task.exception()  # retrieved: the caller's cancellation takes precedence
        raise cancelled
    return task.result()


@attrs.define
class _View:
    """This process's last view of the shared state (loop-clock times), refreshed by each
    refused acquisition and updated by local grants, releases and penalties. Only used to
    estimate waits for the wait notice; decisions are always made by Redis."""

    held: int = 0
    frees_at: list[float] = attrs.Factory(list)  # when released slots free, ascending
    blocked_until: float = -math.inf
    full_at: float = -math.inf  # when a slot frees, as of the last refusal

    def released(self, frees_at: float) -> None:
        bisect.insort(self.frees_at, frees_at)

    def expected_wait(self, now: float, ahead: int, capacity: int, window: float) -> float:
        """Seconds until an acquisition queued behind ``ahead`` others gets its slot: the
        ``ahead``-th slot to free, or a window when that one is still in flight.
        ``capacity``: the slots its priority may hold (``max_requests - reserve`` for bulk)."""
        cut = bisect.bisect_right(self.frees_at, now)
        del self.frees_at[:cut]
        self.held = max(0, self.held - cut)
        rank = ahead - (capacity - self.held)
        return wait_behind(now, rank, self.frees_at, window, self.blocked_until)


def check_positive(**values: float) -> None:
    """`ConfigurationError` for the first of ``values`` that is not a positive number."""
    for name, value in values.items():
        if not value > 0:
            raise ConfigurationError(f"{name} must be a positive number of seconds")


class RedisLimiter(_SlotMixin):
    """Sliding-window limiter for one token, with its slots in Redis (see the module doc).

    Guarantee: as `SlidingWindowLimiter`, across every process sharing ``key`` (all must use
    the same ``max_requests`` and ``window``), provided every request completes within
    ``lease_timeout`` seconds of its slot being granted or renewed (`renew`; a client's
    `Channel` renews a slot whose request waited over ``RENEW_AFTER`` seconds for its
    in-flight cap, and gives the lease ``LEASE_MARGIN`` seconds over its request timeout).
    A slot whose holder never releases it (the process
    died) stays held for ``lease_timeout + window`` seconds, then frees. Bulk
    acquisitions of every process together never hold more than ``max_requests -
    reserve`` slots (the bulk side's ``reserve`` decides).

    Waiting: a waiter sleeps exactly until the time Redis reports a slot frees, re-checks,
    and is woken early by a release or penalty in this process. Releases by other processes
    only ever set a free time at least a window ahead, so polling at least once per window
    (``poll_interval``, at most ``window``) never makes a waiter late. Waiters of one
    process and priority are served FIFO (one gate each), and bulk ones give way to
    interactive ones; across processes the order is best-effort.

    Errors: any Redis failure raises `LimiterBackendError`; there is no silent fallback to
    an in-process limiter. Bad settings raise `ConfigurationError`.
    """

    def __init__(
        self,
        redis: Redis,
        key: str,
        max_requests: int = DEFAULT_MAX_REQUESTS,
        window: float = DEFAULT_WINDOW,
        *,
        reserve: int | None = None,
        lease_timeout: float = DEFAULT_LEASE_TIMEOUT,
        prefix: str = DEFAULT_PREFIX,
        poll_interval: float = 1.0,
        url: str | None = None,
    ) -> None:
        self.reserve = check_limit(max_requests, window, reserve)
        check_positive(lease_timeout=lease_timeout, poll_interval=poll_interval)
        self.max_requests = max_requests
        self.window = float(window)
        self.lease_timeout = float(lease_timeout)
        self.stats = LimiterStats()
        self.key = key
        self.leases_key = f"{prefix}{{{key}}}:leases"
        self.blocked_key = f"{prefix}{{{key}}}:blocked"
        self._redis = redis
        self._where = redact_url(url) if url else "Redis"
        self._window_us = round(self.window * 1e6)
        self._hold_us = round((self.lease_timeout + self.window) * 1e6)
        self._poll = min(float(poll_interval), self.window)
        self._acquire_script: AsyncScript = redis.register_script(_ACQUIRE)
        self._renew_script: AsyncScript = redis.register_script(_RENEW)
        self._release_script: AsyncScript = redis.register_script(_RELEASE)
        self._forget_script: AsyncScript = redis.register_script(_FORGET)
        self._penalize_script: AsyncScript = redis.register_script(_PENALIZE)
        self._gate = {p: asyncio.Lock() for p in PRIORITIES}
        self._changed = {p: asyncio.Event() for p in PRIORITIES}
        # acquisitions not yet granted, per priority: the one at the gate and its queue
        self._pending: dict[Priority, int] = dict.fromkeys(PRIORITIES, 0)
        self._views = {p: _View() for p in PRIORITIES}

    def _bulk_max(self, priority: Priority) -> str:
        return str(self.max_requests - self.reserve if priority == "bulk" else -1)

    def _capacity(self, priority: Priority) -> int:
        return self.max_requests - self.reserve if priority == "bulk" else self.max_requests

    async def _call(self, script: AsyncScript, keys: list[str], args: list[str]) -> Any:
        """Run a script; turn every Redis/connection failure into `LimiterBackendError`."""
        from redis.exceptions import RedisError

        try:
            return await script(keys=keys, args=args)
        except (RedisError, OSError) as error:
            raise LimiterBackendError(
                f"rate-limiter backend {self._where} failed: {type(error).__name__}: {error}"
            ) from error

    async def _try_acquire(self, ident: str, priority: Priority) -> tuple[bool, float]:
        """One attempt: (granted, server time). When refused, the priority's view is
        refreshed. A cancellation arriving while the script runs may leave a granted
        lease behind: it is forgotten (shielded), since no request was sent under it."""
        try:
            reply = await self._call(
                self._acquire_script,
                [self.leases_key, self.blocked_key],
                [
                    str(self.max_requests),
                    str(self._hold_us),
                    ident,
                    str(self._window_us),
                    self._bulk_max(priority),
                ],
            )
        except asyncio.CancelledError:
            # on failure the orphan lease just expires after lease_timeout + window
            with contextlib.suppress(LimiterBackendError):
                await _uncancellable(self._call(self._forget_script, [self.leases_key], [ident]))
            raise
        granted, now_us = int(reply[0]) == 1, int(reply[1])
        if granted:
            for view in self._views.values() if priority == "bulk" else [self._views[priority]]:
                view.held += 1
        else:
            at = asyncio.get_running_loop().time()
            held, blocked_us, full_us, *frees_us = (int(x) for x in reply[2:])
            self._views[priority] = _View(
                held, [at + f / 1e6 for f in frees_us], at + blocked_us / 1e6, at + full_us / 1e6
            )
        return granted, now_us / 1e6

    async def acquire(
        self, on_wait: WaitCallback | None = None, *, priority: Priority = "interactive"
    ) -> Lease:
        """Wait (FIFO within this process and priority) for a free slot and take it.

        As in `SlidingWindowLimiter`, arrival and the wait notice come before the gate: a
        task queued behind the one at the gate is told its expected wait (estimated from
        the last refusal Redis sent), and its wait is counted from its arrival. A bulk
        waiter gives way while an interactive acquisition of this process is pending.
        """
        loop = asyncio.get_running_loop()
        started = loop.time()
        waited = told = False
        if self._pending[priority]:
            # queued behind others: a wait only if the slots are expected to be taken,
            # not merely because the ones ahead are in a Redis round trip
            expected = self._views[priority].expected_wait(
                started, self._pending[priority], self._capacity(priority), self.window
            )
            if expected > 0:
                waited = True
                if on_wait is not None:
                    told = True
                    on_wait(expected)
        self._pending[priority] += 1
        changed = self._changed[priority]
        try:
            async with self._gate[priority]:
                while True:
                    changed.clear()  # before asking, so no release is missed
                    if priority == "bulk" and self._pending["interactive"]:
                        await changed.wait()  # set when the interactive one is granted
                        continue
                    ident = ("b:" if priority == "bulk" else "") + uuid.uuid4().hex
                    granted, server_now = await self._try_acquire(ident, priority)
                    if granted:
                        break
                    waited = True
                    now = loop.time()
                    view = self._views[priority]
                    if on_wait is not None and not told:
                        told = True
                        # every slot in flight: "at least a window", as the in-process one
                        on_wait(max(view.blocked_until - now, min(view.full_at - now, self.window)))
                    wait = max(view.blocked_until, view.full_at) - now
                    with anyio.move_on_after(min(wait, self._poll)):
                        await changed.wait()
                self.stats.requests += 1
                if waited:
                    self.stats.waits += 1
                    self.stats.wait_seconds += loop.time() - started
                return Lease(ident, server_now, priority)
        finally:
            self._pending[priority] -= 1
            if priority == "interactive":
                self._changed["bulk"].set()

    async def renew(self, lease: Lease) -> bool:
        """Extend the lease to a whole ``lease_timeout + window`` from now (Redis time),
        or take it again if it expired meanwhile and its priority has room; False if not."""
        reply = await self._call(
            self._renew_script,
            [self.leases_key],
            [
                lease.ident,
                str(self._hold_us),
                str(self.max_requests),
                self._bulk_max(lease.priority),
            ],
        )
        return int(reply) == 1

    async def release(self, lease: Lease) -> None:
        """The request completed: its slot frees a window from now (Redis time). Runs to
        completion even if the caller is cancelled meanwhile."""
        try:
            await _uncancellable(
                self._call(
                    self._release_script,
                    [self.leases_key],
                    [lease.ident, str(self._window_us)],
                )
            )
        finally:
            frees_at = asyncio.get_running_loop().time() + self.window
            for priority, view in self._views.items():
                if priority == "interactive" or lease.priority == "bulk":
                    view.released(frees_at)
            for changed in self._changed.values():
                changed.set()

    async def penalize(self, retry_after: float | None = None) -> None:
        """A 429: block every process's acquisitions for ``retry_after`` seconds (or a
        window), counted from now on the Redis clock; never shortens an existing block."""
        hold = self.window if retry_after is None else max(0.0, retry_after)
        await self._call(self._penalize_script, [self.blocked_key], [str(round(hold * 1e6))])
        until = asyncio.get_running_loop().time() + hold
        for view in self._views.values():
            view.blocked_until = max(view.blocked_until, until)
        for changed in self._changed.values():
            changed.set()


def redis_limiter_factory(
    redis_url: str,
    *,
    lease_timeout: float = DEFAULT_LEASE_TIMEOUT,
    prefix: str = DEFAULT_PREFIX,
    socket_timeout: float = 5.0,
) -> LimiterFactory:
    """A `LimiterRegistry` factory: ``LimiterRegistry(factory=redis_limiter_factory(url))``.

    One Redis client per event loop (its connections belong to that loop), shared by the
    loop's limiters. ``socket_timeout`` bounds each Redis call so a hung server raises
    `LimiterBackendError` instead of stalling requests.
    """
    redis_asyncio = _import_redis()
    clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Redis] = (
        weakref.WeakKeyDictionary()
    )

    def factory(key: str, max_requests: int, window: float, *, reserve: int) -> RedisLimiter:
        loop = asyncio.get_running_loop()
        client = clients.get(loop)
        if client is None:
            client = clients[loop] = redis_asyncio.from_url(
                redis_url, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout
            )
        return RedisLimiter(
            client,
            key,
            max_requests,
            window,
            reserve=reserve,
            lease_timeout=lease_timeout,
            prefix=prefix,
            url=redis_url,
        )

    return factory


async def check_redis(redis_url: str, *, socket_timeout: float = 5.0) -> None:
    """PING the server; raise `LimiterBackendError` (password redacted) if it cannot answer.

    Call it at start-up so a misconfigured backend fails before any request is attempted.
    """
    redis_asyncio = _import_redis()
    from redis.exceptions import RedisError

    where = redact_url(redis_url)
    try:
        client = redis_asyncio.from_url(
            redis_url, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout
        )
    except ValueError as error:
        raise LimiterBackendError(f"invalid Redis URL {where}: {error}") from None
    try:
        await client.ping()
    except (RedisError, OSError) as error:
        raise LimiterBackendError(
            f"cannot reach the rate-limiter Redis at {where}: {type(error).__name__}: {error}"
        ) from error
    finally:
        await client.aclose()


_registries: dict[tuple[str, float], LimiterRegistry] = {}


def shared_registry(
    redis_url: str, *, lease_timeout: float = DEFAULT_LEASE_TIMEOUT
) -> LimiterRegistry:
    """The process's registry for ``redis_url``: every client configured with the same
    URL (and lease) shares it, so a token has one limiter object per loop, as in-process."""
    key = (redis_url, lease_timeout)
    registry = _registries.get(key)
    if registry is None:
        factory = redis_limiter_factory(redis_url, lease_timeout=lease_timeout)
        registry = _registries[key] = LimiterRegistry(factory=factory)
    return registry
