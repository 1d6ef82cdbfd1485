"""A local SQLite limit store: each token's sliding window survives restarts and is shared
by every process on the host that uses the same file.

Same guarantee and lease rules as `limits_redis`: the server never sees more than
``max_requests`` requests of a token in any ``window``-second span, because each request
holds a slot from before it is sent until ``window`` seconds after its response completed.
A slot is granted as "frees at now + lease_timeout + window"; its release rewrites that to
"now + window". A process that dies holding a slot (SIGKILL, power loss) therefore leaves
it held for ``lease_timeout + window`` seconds, never less, and a rerun started at once
waits for the requests its predecessor sent instead of drawing 429s.

File: tables ``slots`` (token key, lease id, frees-at time), ``blocks`` (a 429 penalty per
token) and ``meta``. The token key is `token_key`'s SHA-256, never the token. Every
operation is one short ``BEGIN IMMEDIATE`` transaction in WAL mode with a busy timeout, so
several processes serialize on the file and readers never block. Operations run on the
event-loop thread: each takes microseconds, and a cancellation can never split one (no
orphan lease is possible).

Clock: times in the file are seconds on a wall-clock scale shared by every process of one
boot. The first process after a boot fixes ``anchor = wall clock - CLOCK_BOOTTIME``; every
process of that boot then reads ``anchor + CLOCK_BOOTTIME``, which steps of the wall clock
(NTP, a manual change) cannot move in either direction, so no step frees a slot early.
After a reboot the anchor is the wall clock, but never earlier than the latest time the
store recorded: a clock that came back behind holds slots longer instead of stalling for
the size of the step. (Without a boot id, as outside Linux, each process anchors on its
own start the same way.) Rows are purged once they have freed, so the file stays small.

Priorities: a bulk lease's id starts with ``b:`` (the primary key makes counting them a
range scan, and the schema is unchanged); bulk is granted only while fewer than
``max_requests - reserve`` such slots are held, and fewer than ``max_requests`` in all.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import anyio

from .exceptions import LimitStoreError
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
)
from .limits_redis import DEFAULT_LEASE_TIMEOUT, _View, check_positive

__all__ = [
    "SCHEMA_VERSION",
    "STORE_ENV",
    "LimitStore",
    "SqliteLimiter",
    "default_store_path",
    "close_stores",
    "open_store",
    "store_limiter_factory",
    "store_registry",
]

SCHEMA_VERSION = 1
STORE_ENV = "LEXER_LIMIT_STORE"
_APPLICATION_ID = 0x4C584C53  # "LXLS": marks the file as a limit store
BUSY_TIMEOUT = 5.0
"""Seconds an operation waits for another process's transaction before failing."""

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE meta (name TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE slots (
  token TEXT NOT NULL, lease TEXT NOT NULL, frees_at REAL NOT NULL,
  PRIMARY KEY (token, lease)
) WITHOUT ROWID;
CREATE INDEX slots_by_time ON slots (token, frees_at);
CREATE TABLE blocks (token TEXT PRIMARY KEY, until REAL NOT NULL) WITHOUT ROWID;
INSERT INTO meta VALUES ('seen', 0.0);
"""


def default_store_path() -> Path:
    """``$LEXER_LIMIT_STORE``, else ``$XDG_CACHE_HOME/lexer-activity/limits.sqlite3``
    (``~/.cache/...`` when unset). Written by hand: one variable and a fallback do not
    justify a dependency."""
    given = os.environ.get(STORE_ENV)
    if given:
        return Path(given).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or ""
    base = Path(cache) if os.path.isabs(cache) else Path.home() / ".cache"
    return base / "lexer-activity" / "limits.sqlite3"


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text("ascii").strip() or None
    except OSError:
        return None


def _boot_clock() -> float:
    """Seconds since boot, suspend included (the server's clock runs on meanwhile)."""
    clock_id = getattr(time, "CLOCK_BOOTTIME", None)
    return time.clock_gettime(clock_id) if clock_id is not None else time.monotonic()


def _while_locked(step: Callable[[], object]) -> None:
    """Run one step of opening the store, again while SQLite says "database is locked":
    while another process opens the store and switches it to WAL mode, reading its header
    or changing the journal mode fails at once, without SQLite's busy handler. Retried
    for up to `BUSY_TIMEOUT`."""
    deadline = time.monotonic() + BUSY_TIMEOUT
    while True:
        try:
            step()
            return
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


class LimitStore:
    """One open limit-store file (one SQLite connection), shared by the limiters of a
    process. Opening validates it: a missing file is created (mode 0600, folder 0700);
    a file that is not a limit store, is corrupt or has a newer schema raises
    `LimitStoreError` naming the path. It is never replaced or silently emptied.

    ``wall``, ``boot_clock`` and ``boot_id`` exist for tests of the clock rules.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        wall: Callable[[], float] = time.time,
        boot_clock: Callable[[], float] = _boot_clock,
        boot_id: Callable[[], str | None] = _boot_id,
    ) -> None:
        self.path = Path(path).expanduser().absolute()
        self._boot_clock = boot_clock
        self._lock = threading.Lock()  # limiters of several loops (threads) may share it
        self._conn = self._connect()
        try:
            self._anchor = self._run(lambda: self._open(wall(), boot_id()))
        except BaseException:
            self._conn.close()
            raise

    def __repr__(self) -> str:
        return f"LimitStore({str(self.path)!r})"

    def _fail(self, reason: str) -> LimitStoreError:
        return LimitStoreError(self.path, reason)

    def _connect(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            if self.path.is_dir():
                raise self._fail("is a folder; give a file path for the limit store")
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
            conn = sqlite3.connect(
                self.path,
                timeout=BUSY_TIMEOUT,
                isolation_level=None,  # explicit transactions only
                check_same_thread=False,
            )
        except OSError as error:
            raise self._fail(f"cannot create or open: {error.strerror or error}") from None
        except sqlite3.Error as error:
            raise self._fail(f"cannot open: {error}") from None
        try:
            _while_locked(lambda: self._is_new(conn))  # before WAL mode rewrites the header
            _while_locked(lambda: conn.execute("PRAGMA journal_mode = WAL"))
            conn.execute("PRAGMA synchronous = NORMAL")  # WAL: durable enough, far cheaper
        except sqlite3.Error as error:
            conn.close()
            raise self._described(error) from None
        except LimitStoreError:
            conn.close()
            raise
        return conn

    def _described(self, error: sqlite3.Error) -> LimitStoreError:
        if isinstance(error, sqlite3.DatabaseError) and (
            "not a database" in str(error) or "malformed" in str(error)
        ):
            return self._fail(
                f"is corrupt or not a limit store ({error}); move it away to start afresh"
            )
        return self._fail(f"failed: {error}")

    def _run(self, work: Callable[[], T]) -> T:
        """Run ``work`` in one ``BEGIN IMMEDIATE`` transaction; any SQLite failure becomes
        a `LimitStoreError` naming the file."""
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    result = work()
                except BaseException:
                    if self._conn.in_transaction:  # SQLite may have rolled back already
                        self._conn.execute("ROLLBACK")
                    raise
                self._conn.execute("COMMIT")
                return result
            except sqlite3.Error as error:
                raise self._described(error) from None

    def _is_new(self, conn: sqlite3.Connection) -> bool:
        """True for an empty file; raises for one that is not a usable limit store. Only
        reads, so a file that is not ours is left exactly as it was."""
        app = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if app == 0 and version == 0:
            if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
                raise self._fail("is an SQLite file but not a limit store; choose another path")
            return True
        if app != _APPLICATION_ID:
            raise self._fail("is an SQLite file but not a limit store; choose another path")
        if version > SCHEMA_VERSION:
            raise self._fail(
                f"was written by a newer lexer-activity-async (store version {version}, this "
                f"one reads {SCHEMA_VERSION}); upgrade, or use another limit store"
            )
        if version != SCHEMA_VERSION:
            raise self._fail(f"has an unknown store version {version}")
        return False

    def _open(self, wall: float, boot_id: str | None) -> float:
        """Check or create the schema, fix the clock anchor, purge freed rows."""
        conn = self._conn
        if self._is_new(conn):  # again inside the transaction: another process may race
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA application_id = {_APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        check = conn.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise self._fail(f"is corrupt ({check}); move it away to start afresh")
        meta = dict(conn.execute("SELECT name, value FROM meta").fetchall())
        boot = self._boot_clock()
        anchor = meta.get("anchor")
        if boot_id is None or meta.get("boot") != boot_id or not isinstance(anchor, float):
            seen = meta.get("seen")
            anchor = max(wall, float(seen) if isinstance(seen, (int, float)) else 0.0) - boot
            if boot_id is not None:
                conn.executemany(
                    "INSERT OR REPLACE INTO meta VALUES (?, ?)",
                    [("boot", boot_id), ("anchor", anchor)],
                )
        now = anchor + boot
        conn.execute("DELETE FROM slots WHERE frees_at <= ?", (now,))
        conn.execute("DELETE FROM blocks WHERE until <= ?", (now,))
        return float(anchor)

    def now(self) -> float:
        """The store's clock (see the module doc), in seconds."""
        return self._anchor + self._boot_clock()

    def _seen(self, now: float) -> None:
        self._conn.execute("UPDATE meta SET value = max(value, ?) WHERE name = 'seen'", (now,))

    # -- the operations (each one transaction) ----------------------------------------

    def try_acquire(
        self,
        key: str,
        ident: str,
        max_requests: int,
        hold: float,
        window: float,
        bulk_max: int | None = None,
    ) -> tuple[bool, float, list[float]]:
        """Grant lease ``ident`` (freeing ``hold`` seconds from now unless released) if
        fewer than ``max_requests`` slots are held, no penalty blocks and, for a bulk
        lease (``bulk_max`` given, ``ident`` starting ``b:``), fewer than ``bulk_max`` bulk
        slots are held. Returns (granted, now, []) or, refused, (False, now, [held,
        blocked_for, full_for, released slots' free-in seconds ascending...]); for bulk,
        ``held`` and the free times are the bulk slots'."""

        def work() -> tuple[bool, float, list[float]]:
            conn = self._conn
            now = self.now()
            conn.execute("DELETE FROM slots WHERE token = ? AND frees_at <= ?", (key, now))
            row = conn.execute("SELECT until FROM blocks WHERE token = ?", (key,)).fetchone()
            blocked = max(0.0, row[0] - now) if row else 0.0
            held = conn.execute("SELECT count(*) FROM slots WHERE token = ?", (key,)).fetchone()[0]
            bulk = self._bulk_slots(key) if bulk_max is not None else []
            if (
                blocked == 0.0
                and held < max_requests
                and (bulk_max is None or len(bulk) < bulk_max)
            ):
                conn.execute("INSERT INTO slots VALUES (?, ?, ?)", (key, ident, now + hold))
                self._seen(now)
                return True, now, []
            full = 0.0
            if held >= max_requests:
                # a late release may have pushed it over: the (held - max + 1)-th to free
                nth = conn.execute(
                    "SELECT frees_at FROM slots WHERE token = ? ORDER BY frees_at LIMIT 1 OFFSET ?",
                    (key, held - max_requests),
                ).fetchone()
                full = max(0.0, nth[0] - now)
            if bulk_max is not None:
                if len(bulk) >= bulk_max:
                    full = max(full, bulk[len(bulk) - bulk_max] - now)
                frees = [f - now for f in bulk[:max_requests] if f <= now + window]
                return False, now, [float(len(bulk)), blocked, full, *frees]
            rows = conn.execute(
                "SELECT frees_at FROM slots WHERE token = ? AND frees_at <= ? "
                "ORDER BY frees_at LIMIT ?",
                (key, now + window, max_requests),
            ).fetchall()
            return False, now, [float(held), blocked, full, *(f - now for (f,) in rows)]

        return self._run(work)

    def _bulk_slots(self, key: str) -> list[float]:
        """When the token's bulk slots free, ascending (inside a transaction)."""
        rows = self._conn.execute(
            "SELECT frees_at FROM slots WHERE token = ? AND lease >= 'b:' AND lease < 'b;' "
            "ORDER BY frees_at",
            (key,),
        ).fetchall()
        return [float(f) for (f,) in rows]

    def renew(
        self, key: str, ident: str, max_requests: int, hold: float, bulk_max: int | None = None
    ) -> bool:
        """The request is about to be sent: lease ``ident`` frees no earlier than ``hold``
        seconds from now. One that expired meanwhile is taken again if its priority has
        room (a penalty does not stop it: it was granted before); False when lost."""

        def work() -> bool:
            conn = self._conn
            now = self.now()
            conn.execute("DELETE FROM slots WHERE token = ? AND frees_at <= ?", (key, now))
            row = conn.execute(
                "SELECT frees_at FROM slots WHERE token = ? AND lease = ?", (key, ident)
            ).fetchone()
            if row is None:
                held = conn.execute(
                    "SELECT count(*) FROM slots WHERE token = ?", (key,)
                ).fetchone()[0]
                if held >= max_requests:
                    return False
                if bulk_max is not None and len(self._bulk_slots(key)) >= bulk_max:
                    return False
            elif row[0] >= now + hold:
                return True
            conn.execute(
                "INSERT INTO slots VALUES (?, ?, ?) ON CONFLICT (token, lease) "
                "DO UPDATE SET frees_at = excluded.frees_at",
                (key, ident, now + hold),
            )
            self._seen(now)
            return True

        return self._run(work)

    def release(self, key: str, ident: str, window: float) -> float:
        """The slot frees ``window`` seconds from now: lowers an in-flight lease, raises
        an overdue one, or re-adds one that had expired (the server did see it)."""

        def work() -> float:
            now = self.now()
            self._conn.execute(
                "INSERT INTO slots VALUES (?, ?, ?) ON CONFLICT (token, lease) "
                "DO UPDATE SET frees_at = excluded.frees_at",
                (key, ident, now + window),
            )
            self._seen(now)
            return now

        return self._run(work)

    def penalize(self, key: str, hold: float) -> float:
        """Block the token until ``hold`` seconds from now; never shortens a block."""

        def work() -> float:
            now = self.now()
            self._conn.execute(
                "INSERT INTO blocks VALUES (?, ?) ON CONFLICT (token) "
                "DO UPDATE SET until = max(until, excluded.until)",
                (key, now + hold),
            )
            self._seen(now)
            return now

        return self._run(work)

    def held(self, key: str) -> int:
        """Slots of ``key`` held now (in flight, or released less than a window ago)."""
        with self._lock:
            try:
                return int(
                    self._conn.execute(
                        "SELECT count(*) FROM slots WHERE token = ? AND frees_at > ?",
                        (key, self.now()),
                    ).fetchone()[0]
                )
            except sqlite3.Error as error:
                raise self._described(error) from None

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class SqliteLimiter(_SlotMixin):
    """Sliding-window limiter for one token with its slots in a `LimitStore`.

    Guarantee: as `SlidingWindowLimiter`, across every process using the same store file
    (all must use the same ``max_requests`` and ``window``), provided every request
    completes within ``lease_timeout`` seconds of its slot being granted or renewed
    (`renew`, as with `RedisLimiter`). Bulk acquisitions of every process together
    never hold more than ``max_requests - reserve`` slots. Waiting works as in
    `RedisLimiter`: a waiter sleeps until the store says a slot frees, is woken early by
    this process's releases and penalties, and polls at least every ``poll_interval``
    seconds (releases elsewhere only free slots a window later). Waiters of one process
    and priority are served
    FIFO, bulk ones giving way to interactive ones; across processes the order is
    best-effort. Store failures raise `LimitStoreError` (a `LimiterBackendError`); there
    is no fallback. Bad settings raise `ConfigurationError`.
    """

    def __init__(
        self,
        store: LimitStore,
        key: str,
        max_requests: int = DEFAULT_MAX_REQUESTS,
        window: float = DEFAULT_WINDOW,
        *,
        reserve: int | None = None,
        lease_timeout: float = DEFAULT_LEASE_TIMEOUT,
        poll_interval: float = 1.0,
    ) -> None:
        self.reserve = check_limit(max_requests, window, reserve)
        check_positive(lease_timeout=lease_timeout, poll_interval=poll_interval)
        self.store = store
        self.key = key
        self.max_requests = max_requests
        self.window = float(window)
        self.lease_timeout = float(lease_timeout)
        self.stats = LimiterStats()
        self._poll = min(float(poll_interval), self.window)
        self._gate = {p: asyncio.Lock() for p in PRIORITIES}
        self._changed = {p: asyncio.Event() for p in PRIORITIES}
        # acquisitions not yet granted, per priority: the one at the gate and its queue
        self._pending: dict[Priority, int] = dict.fromkeys(PRIORITIES, 0)
        self._views = {p: _View() for p in PRIORITIES}

    def __repr__(self) -> str:
        return f"SqliteLimiter({self.max_requests} per {self.window:g}s, {self.store!r})"

    @property
    def in_use(self) -> int:
        return self.store.held(self.key)

    def _bulk_max(self, priority: Priority) -> int | None:
        return self.max_requests - self.reserve if priority == "bulk" else None

    def _try_acquire(self, ident: str, priority: Priority) -> tuple[bool, float]:
        granted, now, refusal = self.store.try_acquire(
            self.key,
            ident,
            self.max_requests,
            self.lease_timeout + self.window,
            self.window,
            self._bulk_max(priority),
        )
        if granted:
            for view in self._views.values() if priority == "bulk" else [self._views[priority]]:
                view.held += 1
        else:
            at = asyncio.get_running_loop().time()
            held, blocked, full, *frees = refusal
            self._views[priority] = _View(
                int(held), [at + f for f in frees], at + blocked, at + full
            )
        return granted, now

    async def acquire(
        self, on_wait: WaitCallback | None = None, *, priority: Priority = "interactive"
    ) -> Lease:
        """Wait (FIFO within this process and priority) for a free slot and take it;
        arrival and the wait notice come before the gate, as in the other limiters."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        waited = told = False
        capacity = self.max_requests - (self.reserve if priority == "bulk" else 0)
        if self._pending[priority]:
            expected = self._views[priority].expected_wait(
                started, self._pending[priority], capacity, self.window
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
                    granted, store_now = self._try_acquire(ident, priority)
                    if granted:
                        break
                    waited = True
                    now = loop.time()
                    view = self._views[priority]
                    if on_wait is not None and not told:
                        told = True
                        on_wait(max(view.blocked_until - now, min(view.full_at - now, self.window)))
                    wait = max(view.blocked_until, view.full_at) - now
                    with anyio.move_on_after(min(wait, self._poll)):
                        await changed.wait()
                self.stats.requests += 1
                if waited:
                    self.stats.waits += 1
                    self.stats.wait_seconds += loop.time() - started
                return Lease(ident, store_now, priority)
        finally:
            self._pending[priority] -= 1
            if priority == "interactive":
                self._changed["bulk"].set()

    async def renew(self, lease: Lease) -> bool:
        """Extend the lease to a whole ``lease_timeout + window`` from now (store clock),
        or take it again if it expired meanwhile and its priority has room; False if not."""
        return self.store.renew(
            self.key,
            lease.ident,
            self.max_requests,
            self.lease_timeout + self.window,
            self._bulk_max(lease.priority),
        )

    async def release(self, lease: Lease) -> None:
        """The request completed: its slot frees a window from now (store clock)."""
        try:
            self.store.release(self.key, lease.ident, self.window)
        finally:
            frees_at = asyncio.get_running_loop().time() + self.window
            for priority, view in self._views.items():
                if priority == "interactive" or lease.priority == "bulk":
                    view.released(frees_at)
            for changed in self._changed.values():
                changed.set()

    async def penalize(self, retry_after: float | None = None) -> None:
        """A 429: block every process's acquisitions of this token for ``retry_after``
        seconds (or a window); never shortens an existing block."""
        hold = self.window if retry_after is None else max(0.0, retry_after)
        self.store.penalize(self.key, hold)
        until = asyncio.get_running_loop().time() + hold
        for view in self._views.values():
            view.blocked_until = max(view.blocked_until, until)
        for changed in self._changed.values():
            changed.set()


_stores: dict[Path, LimitStore] = {}
_registries: dict[tuple[Path, float], LimiterRegistry] = {}
_open_lock = threading.Lock()


def open_store(path: str | os.PathLike[str] | None = None) -> LimitStore:
    """The process's open `LimitStore` for ``path`` (default: `default_store_path`),
    opened and validated on first use. Raises `LimitStoreError` naming the path."""
    resolved = Path(path if path is not None else default_store_path()).expanduser().absolute()
    with _open_lock:
        store = _stores.get(resolved)
        if store is None:
            store = _stores[resolved] = LimitStore(resolved)
        return store


def store_limiter_factory(
    store: LimitStore, *, lease_timeout: float = DEFAULT_LEASE_TIMEOUT
) -> LimiterFactory:
    """A `LimiterRegistry` factory keeping every token's slots in ``store``."""

    def factory(key: str, max_requests: int, window: float, *, reserve: int) -> SqliteLimiter:
        return SqliteLimiter(
            store, key, max_requests, window, reserve=reserve, lease_timeout=lease_timeout
        )

    return factory


def store_registry(
    path: str | os.PathLike[str] | None = None,
    *,
    lease_timeout: float = DEFAULT_LEASE_TIMEOUT,
) -> LimiterRegistry:
    """The process's registry for the store at ``path``: every client using the same
    file (and lease) shares it, so a token has one limiter object per loop."""
    store = open_store(path)
    key = (store.path, lease_timeout)
    with _open_lock:
        registry = _registries.get(key)
        if registry is None:
            factory = store_limiter_factory(store, lease_timeout=lease_timeout)
            registry = _registries[key] = LimiterRegistry(factory=factory)
        return registry


def close_stores() -> None:
    """Close every store `open_store` opened in this process and forget their registries
    (a later `open_store` reopens the file). For tests and long-lived hosts."""
    with _open_lock:
        for store in _stores.values():
            store.close()
        _stores.clear()
        _registries.clear()
