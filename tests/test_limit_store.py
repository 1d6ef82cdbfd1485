"""The local limit store: restarts, leases and clock steps (on injected clocks), what the
file holds (hashes, never tokens), and bad input (unwritable, corrupt, foreign, newer)
failing clearly before any request. Waiting behaviour is in the conformance suite."""

from __future__ import annotations

import sqlite3
import stat
from pathlib import Path
from typing import Any

import pytest
from conftest import TOKEN_A

from lexer_activity_async import LexerClient
from lexer_activity_async.backfill import BackfillSpec, SpecError
from lexer_activity_async.exceptions import ConfigurationError, LimitStoreError
from lexer_activity_async.limits import token_key
from lexer_activity_async.limits_sqlite import (
    SCHEMA_VERSION,
    LimitStore,
    SqliteLimiter,
    default_store_path,
    open_store,
)
from lexer_activity_async.sandbox import Sandbox

N, W, LEASE = 3, 300.0, 60.0
KEY = "k" * 64
WALL = 1_800_000_000.0  # some wall-clock reading


class Clocks:
    """A host's clocks, set by hand: the wall clock, the boot clock and the boot id."""

    def __init__(self) -> None:
        self.wall = WALL
        self.boot = 1000.0
        self.boot_id = "boot-1"

    def open(self, path: Path) -> LimitStore:
        return LimitStore(
            path, wall=lambda: self.wall, boot_clock=lambda: self.boot, boot_id=lambda: self.boot_id
        )

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.boot += seconds


def grant(store: LimitStore, ident: str) -> bool:
    return store.try_acquire(KEY, ident, N, LEASE + W, W)[0]


@pytest.fixture
def clocks() -> Clocks:
    return Clocks()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "store" / "limits.sqlite3"


# -- restarts and leases -----------------------------------------------------------------


def test_released_slots_are_held_a_window_across_a_restart(clocks: Clocks, path: Path) -> None:
    first = clocks.open(path)
    for i in range(N):
        assert grant(first, f"a{i}")
        first.release(KEY, f"a{i}", W)
    first.close()  # the process ends; its slots stay held

    clocks.advance(W - 0.001)
    second = clocks.open(path)
    assert not grant(second, "b0"), "a restart must not start with an empty window"
    clocks.advance(0.001)
    assert grant(second, "b0")


def test_a_dead_holders_slot_is_held_for_lease_timeout_plus_window(
    clocks: Clocks, path: Path
) -> None:
    dead = clocks.open(path)
    assert grant(dead, "never-released")
    dead.close()  # SIGKILL: no release

    live = clocks.open(path)
    for i in range(N - 1):
        assert grant(live, f"x{i}")
        live.release(KEY, f"x{i}", 0.001)  # (tiny window: only the dead slot stays)
    clocks.advance(LEASE + W - 0.01)
    assert live.held(KEY) == 1
    assert grant(live, "y0")
    assert grant(live, "y1")
    assert not grant(live, "y2")
    clocks.advance(0.01)
    assert grant(live, "y2")


def test_refusal_reports_what_frees_when(clocks: Clocks, path: Path) -> None:
    store = clocks.open(path)
    for i in range(N):
        assert grant(store, f"a{i}")
    store.release(KEY, "a1", W)
    clocks.advance(10)
    store.penalize(KEY, 20)
    granted, now, (held, blocked, full, *frees) = store.try_acquire(KEY, "z", N, LEASE + W, W)
    assert not granted
    assert now == pytest.approx(WALL + 10)
    assert held == N
    assert blocked == pytest.approx(20)
    assert full == pytest.approx(W - 10)  # the released slot frees first
    assert frees == [pytest.approx(W - 10)]


# -- clock steps --------------------------------------------------------------------------


def test_wall_clock_steps_within_a_boot_change_nothing(clocks: Clocks, path: Path) -> None:
    store = clocks.open(path)
    for i in range(N):
        assert grant(store, f"a{i}")
        store.release(KEY, f"a{i}", W)
    before = store.now()
    clocks.wall += 3600  # NTP or a person moves the clock an hour ahead ...
    ahead = clocks.open(path)  # ... and a new process starts
    assert ahead.now() == pytest.approx(before)
    assert not grant(ahead, "b"), "a forward step must not free slots early"
    clocks.wall -= 7200  # and then an hour behind
    behind = clocks.open(path)
    assert behind.now() == pytest.approx(before)
    clocks.boot += W
    assert grant(behind, "c"), "nor hold them longer"


def test_after_a_reboot_a_clock_behind_neither_frees_early_nor_stalls(
    clocks: Clocks, path: Path
) -> None:
    store = clocks.open(path)
    for i in range(N):
        assert grant(store, f"a{i}")
        store.release(KEY, f"a{i}", W)
    seen = store.now()
    store.close()
    clocks.boot, clocks.boot_id = 5.0, "boot-2"
    clocks.wall = 0.0  # came back with a dead RTC: 1970
    rebooted = clocks.open(path)
    assert rebooted.now() == pytest.approx(seen), "the store's latest time, not 1970"
    assert not grant(rebooted, "b")
    clocks.boot += W
    assert grant(rebooted, "b"), "a window later, not decades later"


def test_after_a_reboot_a_clock_ahead_is_followed(clocks: Clocks, path: Path) -> None:
    clocks.open(path).close()
    clocks.boot, clocks.boot_id = 5.0, "boot-2"
    clocks.wall += 100
    assert clocks.open(path).now() == pytest.approx(WALL + 100)


def test_without_a_boot_id_each_process_anchors_on_its_start(clocks: Clocks, path: Path) -> None:
    clocks.boot_id = None  # type: ignore[assignment]
    store = clocks.open(path)
    assert grant(store, "a")
    clocks.wall -= 3600
    again = clocks.open(path)
    assert again.now() == pytest.approx(store.now()), "never behind what the store saw"


# -- the file -----------------------------------------------------------------------------


async def test_the_file_holds_token_hashes_never_tokens(
    sandbox: Sandbox, client_for: Any, path: Path
) -> None:
    async with client_for(sandbox, token=TOKEN_A, limit_store=path, registry=None) as client:
        await client.users()
        assert isinstance(client.limiter, SqliteLimiter)
        assert client.limiter.in_use == 1
        assert TOKEN_A not in repr(client.limiter)
    raw = b"".join(p.read_bytes() for p in path.parent.iterdir())
    assert TOKEN_A.encode() not in raw
    with sqlite3.connect(path) as conn:
        tokens = {row[0] for row in conn.execute("SELECT token FROM slots")}
    assert tokens == {token_key(TOKEN_A)}
    assert _modes(path) == (0o600, 0o700)


async def test_clients_of_one_store_share_the_limiter(sandbox: Sandbox, path: Path) -> None:
    api, status = sandbox.api_url, sandbox.status_url
    async with (
        LexerClient(TOKEN_A, limit_store=path, api_url=api, status_url=status) as one,
        LexerClient(TOKEN_A, limit_store=str(path), api_url=api, status_url=status) as two,
    ):
        assert one.limiter is two.limiter
        assert open_store(path) is one.limiter.store  # type: ignore[attr-defined]


def test_default_path_is_the_env_then_the_user_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("LEXER_LIMIT_STORE", str(tmp_path / "mine.db"))
    assert default_store_path() == tmp_path / "mine.db"
    monkeypatch.delenv("LEXER_LIMIT_STORE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_store_path() == tmp_path / "xdg" / "lexer-activity" / "limits.sqlite3"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    expected = tmp_path / "home" / ".cache" / "lexer-activity" / "limits.sqlite3"
    assert default_store_path() == expected


def _contents(path: Path) -> bytes:
    return path.read_bytes()


def _modes(path: Path) -> tuple[int, int]:
    return stat.S_IMODE(path.stat().st_mode), stat.S_IMODE(path.parent.stat().st_mode)


# -- bad input: a clear error naming the path, before any request ---------------------------


def _corrupt(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x8f not an sqlite file \x00" * 300)


def _foreign(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE units (id TEXT)")
    conn.close()


def _newer(path: Path) -> None:
    LimitStore(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()


def _truncated(path: Path) -> None:
    store = LimitStore(path)
    for i in range(2000):  # enough rows for several pages
        store.release(KEY, f"lease-{i:05d}", W)
    store.close()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _under_a_file(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.parent.joinpath("file").write_text("x")
    return path.parent / "file" / "limits.sqlite3"


BAD = {
    "corrupt": (_corrupt, "is corrupt or not a limit store"),
    "foreign": (_foreign, "not a limit store"),
    "newer": (_newer, "newer lexer-activity-async"),
    "truncated": (_truncated, "corrupt"),
}


@pytest.mark.parametrize("kind", sorted(BAD))
async def test_a_bad_store_fails_before_any_request_and_is_left_alone(
    kind: str, sandbox: Sandbox, client_for: Any, path: Path
) -> None:
    make, message = BAD[kind]
    make(path)
    before = _contents(path)
    client = client_for(sandbox, token=TOKEN_A, limit_store=path, registry=None)
    with pytest.raises(LimitStoreError, match=message) as caught:
        await client.open()
    await client.aclose()
    assert caught.value.path == str(path)
    assert str(path) in str(caught.value)
    assert TOKEN_A not in str(caught.value)
    assert sandbox.stats.requests == {}
    assert _contents(path) == before, "never replaced or emptied"


@pytest.mark.parametrize("where", ["under a file", "a folder"])
def test_an_unusable_path_names_it(where: str, path: Path) -> None:
    if where == "under a file":
        target = _under_a_file(path)
    else:
        path.mkdir(parents=True)
        target = path
    with pytest.raises(LimitStoreError) as caught:
        LimitStore(target)
    assert caught.value.path == str(target)
    assert caught.value.reason


def test_limit_store_excludes_redis_and_registry(path: Path) -> None:
    from lexer_activity_async.limits import LimiterRegistry

    with pytest.raises(ConfigurationError, match="one of limit_store"):
        LexerClient(TOKEN_A, limit_store=path, redis_url="redis://127.0.0.1:1/0")
    with pytest.raises(ConfigurationError, match="one of limit_store"):
        LexerClient(TOKEN_A, limit_store=path, registry=LimiterRegistry())


# -- the spec key ---------------------------------------------------------------------------


def test_spec_limit_store_is_relative_to_the_spec(tmp_path: Path, write_spec: Any) -> None:
    base = {
        "date_from": "2024-01-01",
        "date_to": "2024-02-01",
        "reports": ["summary"],
        "tokens": [{"label": "team", "env": "X_TOKEN"}],
    }
    spec = BackfillSpec.from_toml(write_spec(tmp_path / "a.toml", {**base, "limit_store": "l.db"}))
    assert spec.limit_store == tmp_path / "l.db"
    memory = write_spec(tmp_path / "b.toml", {**base, "limit_store": "memory"})
    assert BackfillSpec.from_toml(memory).limit_store == "memory"
    assert BackfillSpec.from_toml(write_spec(tmp_path / "c.toml", base)).limit_store is None
    for bad, message in (
        ({"limit_store": ""}, "non-empty path"),
        ({"limit_store": 3}, "must be a string"),
        ({"limit_store": "l.db", "redis_url": "redis://127.0.0.1/0"}, "either `redis_url`"),
    ):
        with pytest.raises(SpecError, match=message):
            BackfillSpec.from_toml(write_spec(tmp_path / "d.toml", {**base, **bad}))


# -- the command line -----------------------------------------------------------------------


def _cli(*args: str, token: str = TOKEN_A) -> Any:
    from click.testing import CliRunner

    from lexer_activity_async.cli import main

    return CliRunner().invoke(main, list(args), env={"LEXER_API_TOKEN": token, "COLUMNS": "200"})


def _slots(path: Path) -> set[str]:
    with sqlite3.connect(path) as conn:
        found = {row[0] for row in conn.execute("SELECT token FROM slots")}
    conn.close()
    return found


def test_cli_keeps_the_limit_in_the_default_store(
    sandbox_in_thread: Any,
    private_limit_store: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sb = sandbox_in_thread()
    monkeypatch.chdir(tmp_path)
    window = ["--from", "2024-01-01", "--to", "2024-02-01", "--api-url", sb.api_url]
    result = _cli("report", "summary", *window)
    assert result.exit_code == 0, result.output
    assert _slots(private_limit_store) == {token_key(TOKEN_A)}  # $LEXER_LIMIT_STORE

    chosen = tmp_path / "chosen.sqlite3"
    assert _cli("report", "summary", *window, "--limit-store", str(chosen)).exit_code == 0
    assert _slots(chosen) == {token_key(TOKEN_A)}

    in_process = tmp_path / "memory"  # what a path named "memory" would have created
    with_memory = _cli("report", "summary", *window, "--limit-store", "memory")
    assert with_memory.exit_code == 0, with_memory.output
    assert not in_process.exists()
    assert sum(sb.stats.requests.values()) == 3


@pytest.mark.parametrize("kind", ["corrupt", "newer"])
def test_cli_bad_store_is_one_line_and_sends_nothing(
    kind: str, sandbox_in_thread: Any, path: Path
) -> None:
    sb = sandbox_in_thread()
    BAD[kind][0](path)
    window = ["--from", "2024-01-01", "--to", "2024-02-01", "--api-url", sb.api_url]
    result = _cli("report", "summary", *window, "--limit-store", str(path))
    assert result.exit_code == 1
    assert result.output.startswith(f"Error: rate-limit store {path} ")
    assert len(result.output.strip().splitlines()) == 1
    assert "Traceback" not in result.output
    assert TOKEN_A not in result.output
    assert sb.stats.requests == {}


def test_cli_backfill_store_from_spec_option_or_default(
    sandbox_in_thread: Any, write_spec: Any, tmp_path: Path, private_limit_store: Path
) -> None:
    sb = sandbox_in_thread()
    spec_data = {
        "date_from": "2024-01-01",
        "date_to": "2024-02-01",
        "reports": ["summary"],
        "api_url": sb.api_url,
        "status_url": sb.status_url,
        "tokens": [{"label": "team", "env": "LEXER_API_TOKEN"}],
    }
    plain = write_spec(tmp_path / "plain.toml", {**spec_data, "output": str(tmp_path / "o1")})
    assert _cli("backfill", str(plain)).exit_code == 0
    assert _slots(private_limit_store) == {token_key(TOKEN_A)}

    corrupt = tmp_path / "bad.sqlite3"
    _corrupt(corrupt)
    keyed = write_spec(
        tmp_path / "keyed.toml",
        {**spec_data, "output": str(tmp_path / "o2"), "limit_store": "bad.sqlite3"},
    )
    result = _cli("backfill", str(keyed))
    assert result.exit_code == 1
    assert f"rate-limit store {corrupt} is corrupt" in result.output
    assert not (tmp_path / "o2" / "team").exists()

    good = tmp_path / "good.sqlite3"
    assert _cli("backfill", str(keyed), "--limit-store", str(good)).exit_code == 0
    assert _slots(good) == {token_key(TOKEN_A)}
    assert sum(sb.stats.requests.values()) == 2


def test_cli_limit_store_and_redis_url_exclude_each_other(path: Path) -> None:
    result = _cli("users", "--limit-store", str(path), "--redis-url", "redis://127.0.0.1:1/0")
    assert result.exit_code == 2
    assert "either --limit-store or --redis-url" in result.output
    assert not path.exists()


def test_a_store_locked_too_long_is_a_typed_error(
    clocks: Clocks, path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not sqlite3.OperationalError, which the command line would blame on a checkpoint."""
    from lexer_activity_async import limits_sqlite

    store = clocks.open(path)
    monkeypatch.setattr(limits_sqlite, "BUSY_TIMEOUT", 0.05)
    other = clocks.open(path)  # a second process, impatient
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process inside a long transaction
    try:
        with pytest.raises(LimitStoreError, match="database is locked") as caught:
            grant(other, "x")
        assert caught.value.path == str(path)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert grant(other, "x")
    assert store.held(KEY) == 1
