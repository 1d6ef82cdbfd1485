"""Proxy and TLS options on every session, against real proxies on loopback: tinyproxy
(a packaged forward proxy) and `recording_proxy` (which keeps every request it is sent),
and the sandbox served over TLS with a private CA (trustme)."""

from __future__ import annotations

import logging
import os
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from conftest import (
    TOKEN_A,
    TOKEN_B,
    ClientFor,
    MakeClient,
    SandboxFactory,
    SandboxInThread,
    WriteSpec,
)
from recording_proxy import RecordingProxy
from redis_server import free_port
from test_backfill import ENV_A, ENV_B, make_spec
from test_cli import ENV_A as CLI_ENV_A
from test_cli import ENV_B as CLI_ENV_B
from test_cli import base_spec, invoke
from test_exports import FEB, JAN, POLL
from tinyproxy_server import find_tinyproxy, tinyproxy

from lexer_activity_async import LimiterRegistry, events
from lexer_activity_async import exceptions as exc
from lexer_activity_async.backfill import BackfillSpec, SpecError, run_backfill
from lexer_activity_async.network import network
from lexer_activity_async.sandbox import Sandbox

ENVIRONMENT = (
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "all_proxy",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
)
FILE_HEADERS = {"host", "accept", "accept-encoding", "range", "if-range"}
"""All a file request may carry: no token, no Authorization, no User-Agent."""


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> Path:
    path = tmp_path / "private-ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture
async def tls_sandbox(ca: trustme.CA, sandbox_factory: SandboxFactory) -> Sandbox:
    """The sandbox's three origins over https, with a certificate from the private CA."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    return await sandbox_factory(ssl=context)


def _need_tinyproxy() -> None:
    if find_tinyproxy() is None:
        if os.environ.get("CI") == "true":
            pytest.fail("tinyproxy is required under CI=true (apt-get install tinyproxy)")
        pytest.skip("tinyproxy is not installed (apt-get install tinyproxy)")


def _port(url: str) -> str:
    return url.split("://", 1)[1].split("/", 1)[0]


async def _export(client_for: ClientFor, sb: Sandbox, tmp_path: Path, **options: Any) -> None:
    async with client_for(sb, **options) as client:
        result = await client.export("case_details", JAN, FEB, tmp_path / "c.csv", poll=POLL)
    assert result.bytes > 0
    assert all(p.stat().st_size > 0 for p in result.paths)


# -- every session through the proxy; no credential on file requests -------------------


async def test_api_status_and_file_requests_all_go_through_tinyproxy(
    make_client: MakeClient, sandbox: Sandbox, tmp_path: Path
) -> None:
    _need_tinyproxy()
    with tinyproxy(tmp_path) as (proxy_url, log):
        async with make_client(proxy=proxy_url, trust_env=False) as client:
            await client.export("case_details", JAN, FEB, tmp_path / "c.csv", poll=POLL)
        text = log.read_text()
    assert sandbox.stats.file_requests >= 1
    assert sandbox.stats.leaks == 0  # what tinyproxy forwarded to the file host: no token
    assert f"{sandbox.api_url}/" in text
    assert f"{sandbox.status_url}/" in text
    assert f"{sandbox.files_url}/" in text
    assert TOKEN_A not in text


async def test_file_requests_through_a_proxy_carry_no_credential(
    client_for: ClientFor, sandbox: Sandbox, tmp_path: Path
) -> None:
    async with RecordingProxy() as proxy:
        await _export(client_for, sandbox, tmp_path, proxy=proxy.url, trust_env=False)
    by_host: dict[str, list[Any]] = {}
    for request in proxy.seen:
        for name, base in (
            ("api", sandbox.api_url),
            ("status", sandbox.status_url),
            ("files", sandbox.files_url),
        ):
            if request.target.startswith(base + "/"):
                by_host.setdefault(name, []).append(request)
    assert sum(map(len, by_host.values())) == len(proxy.seen)
    assert set(by_host) == {"api", "status", "files"}
    # The recorder does see credentials: every API and status request carries the token.
    assert all(TOKEN_A.encode() in r.raw for r in by_host["api"] + by_host["status"])
    for request in by_host["files"]:
        assert request.header_names() <= FILE_HEADERS, request.headers
        assert TOKEN_A.encode() not in request.raw
    assert sandbox.stats.file_requests == len(by_host["files"])
    assert sandbox.stats.leaks == 0


async def test_a_callers_file_session_carries_the_downloads_and_stays_open(
    client_for: ClientFor, sandbox: Sandbox, tmp_path: Path
) -> None:
    async with (
        RecordingProxy() as proxy,
        aiohttp.ClientSession(proxy=proxy.url, skip_auto_headers=("User-Agent",)) as mine,
    ):
        await _export(client_for, sandbox, tmp_path, file_session=mine, trust_env=False)
        assert not mine.closed  # the caller's to close
    assert proxy.seen  # only the downloads went through the caller's proxy
    assert all(r.target.startswith(sandbox.files_url + "/") for r in proxy.seen)
    for request in proxy.seen:
        assert request.header_names() <= FILE_HEADERS, request.headers
        assert TOKEN_A.encode() not in request.raw


async def test_https_goes_through_connect_tunnels_and_the_proxy_sees_no_header(
    client_for: ClientFor, tls_sandbox: Sandbox, ca_file: Path, tmp_path: Path
) -> None:
    async with RecordingProxy() as proxy:
        await _export(
            client_for, tls_sandbox, tmp_path, proxy=proxy.url, ca_bundle=ca_file, trust_env=False
        )
    assert {r.method for r in proxy.seen} == {"CONNECT"}
    assert set(proxy.targets()) == {
        _port(tls_sandbox.api_url),
        _port(tls_sandbox.status_url),
        _port(tls_sandbox.files_url),
    }
    # A CONNECT carries aiohttp's own few headers; the requests' go inside the tunnel.
    connect_headers = {"host", "user-agent", "accept", "accept-encoding"}
    for request in proxy.seen:
        assert request.header_names() <= connect_headers, request.headers
        assert TOKEN_A.encode() not in request.raw
    assert tls_sandbox.stats.file_requests >= 1
    assert tls_sandbox.stats.leaks == 0


async def test_https_through_tinyproxy(
    client_for: ClientFor, tls_sandbox: Sandbox, ca_file: Path, tmp_path: Path
) -> None:
    _need_tinyproxy()
    with tinyproxy(tmp_path) as (proxy_url, log):
        await _export(
            client_for, tls_sandbox, tmp_path, proxy=proxy_url, ca_bundle=ca_file, trust_env=False
        )
        text = log.read_text()
    for url in (tls_sandbox.api_url, tls_sandbox.status_url, tls_sandbox.files_url):
        assert f"CONNECT {_port(url)} " in text
    assert TOKEN_A not in text


# -- TLS: which CAs are trusted ----------------------------------------------------------


async def test_a_private_ca_is_trusted_through_ca_bundle_or_an_ssl_context(
    client_for: ClientFor, tls_sandbox: Sandbox, ca: trustme.CA, ca_file: Path, tmp_path: Path
) -> None:
    assert tls_sandbox.api_url.startswith("https://")
    await _export(client_for, tls_sandbox, tmp_path, ca_bundle=ca_file)
    context = ssl.create_default_context()
    ca.configure_trust(context)
    await _export(client_for, tls_sandbox, tmp_path, ssl=context)
    assert tls_sandbox.stats.leaks == 0


async def test_an_untrusted_certificate_is_a_tls_error_never_retried(
    client_for: ClientFor, tls_sandbox: Sandbox
) -> None:
    seen: list[object] = []
    async with client_for(tls_sandbox, on_event=seen.append) as client:
        with pytest.raises(exc.TLSError, match="TLS certificate verification failed") as caught:
            await client.users()
    assert isinstance(caught.value, exc.LexerConnectionError)
    assert "ca_bundle" in str(caught.value)
    assert not [e for e in seen if isinstance(e, events.Retrying)]
    assert TOKEN_A not in str(caught.value)


async def test_ssl_cert_file_is_honoured_with_trust_env_and_ignored_without(
    client_for: ClientFor,
    tls_sandbox: Sandbox,
    ca_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
    await _export(client_for, tls_sandbox, tmp_path)
    async with client_for(tls_sandbox, trust_env=False) as client:
        with pytest.raises(exc.TLSError, match="certificate"):
            await client.users()


def test_an_unreadable_ssl_cert_file_is_a_configuration_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "missing.pem"))
    with pytest.raises(exc.ConfigurationError, match=r"\$SSL_CERT_FILE"):
        network()
    network(trust_env=False)  # not read at all


async def test_ssl_false_skips_verification_with_a_warning(
    client_for: ClientFor, tls_sandbox: Sandbox, tmp_path: Path
) -> None:
    with pytest.warns(UserWarning, match="not verified"):
        client = client_for(tls_sandbox, ssl=False)
    async with client:
        assert await client.users()


# -- the environment ---------------------------------------------------------------------


async def test_proxy_variables_are_honoured_by_default_and_ignored_without_trust_env(
    client_for: ClientFor, sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with RecordingProxy() as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        async with client_for(sandbox) as client:
            await client.users()
        assert proxy.targets() == [f"{sandbox.api_url}/users"]
        async with client_for(sandbox, trust_env=False) as client:
            await client.groups()
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        async with client_for(sandbox) as client:
            await client.forms()
        assert len(proxy.seen) == 1
    assert sandbox.stats.requests[Sandbox.key(TOKEN_A)] == 3


async def test_https_proxy_variable_tunnels_https(
    client_for: ClientFor,
    tls_sandbox: Sandbox,
    ca_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with RecordingProxy() as proxy:
        monkeypatch.setenv("HTTPS_PROXY", proxy.url)
        monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # must not be used for https
        await _export(client_for, tls_sandbox, tmp_path, ca_bundle=ca_file)
        assert {r.method for r in proxy.seen} == {"CONNECT"}
        assert _port(tls_sandbox.files_url) in proxy.targets()
        count = len(proxy.seen)
        async with client_for(tls_sandbox, ca_bundle=ca_file, trust_env=False) as client:
            await client.users()
        assert len(proxy.seen) == count


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("HTTPS_PROXY", "http://user:hunter2@:nope"),
        ("http_proxy", "proxy.corp:3128"),  # no scheme
        ("HTTPS_PROXY", "https://user:hunter2@proxy.corp:3128"),  # aiohttp would ignore it
        ("HTTPS_PROXY", "http://user:hunter2@[proxy"),  # urlsplit itself refuses it
    ],
)
def test_a_malformed_proxy_variable_is_a_configuration_error_naming_it(
    name: str, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(exc.ConfigurationError, match=rf"\${name}") as caught:
        network()
    assert "hunter2" not in str(caught.value)
    network(trust_env=False)
    network(proxy="http://127.0.0.1:3128")  # an explicit proxy wins over the variables


# -- a proxy that refuses ----------------------------------------------------------------


async def test_a_proxy_that_cannot_be_reached_is_named(make_client: MakeClient) -> None:
    async with make_client(proxy=f"http://127.0.0.1:{free_port()}", trust_env=False) as client:
        with pytest.raises(exc.ProxyError, match="cannot connect to the proxy"):
            await client.users(max_retries=0)


@pytest.mark.parametrize(("status", "retried"), [(407, False), (502, True)])
async def test_a_proxy_refusing_the_tunnel_is_a_proxy_error(
    client_for: ClientFor, tls_sandbox: Sandbox, ca_file: Path, status: int, retried: bool
) -> None:
    seen: list[object] = []
    async with RecordingProxy(answer=status) as proxy:
        client = client_for(
            tls_sandbox, proxy=proxy.url, ca_bundle=ca_file, trust_env=False, on_event=seen.append
        )
        async with client:
            with pytest.raises(exc.ProxyError, match=rf"proxy refused .* HTTP {status}") as caught:
                await client.users(max_retries=1)
    assert caught.value.status == status
    assert isinstance(caught.value, exc.LexerConnectionError)
    assert len(proxy.seen) == (2 if retried else 1)
    assert bool([e for e in seen if isinstance(e, events.Retrying)]) is retried
    assert tls_sandbox.stats.requests == {}


async def test_a_forward_proxy_answering_407_or_a_proxy_status_error_is_a_proxy_error(
    client_for: ClientFor, sandbox: Sandbox
) -> None:
    refusing = RecordingProxy(answer=407, reason="Proxy Authentication Required")
    async with refusing as proxy, client_for(sandbox, proxy=proxy.url, trust_env=False) as client:
        with pytest.raises(exc.ProxyError, match="requires authentication") as caught:
            await client.users()
    assert caught.value.status == 407
    assert len(proxy.seen) == 1  # not retried
    failing = [("Proxy-Status", "corp-proxy; error=destination_unavailable")]
    failing_proxy = RecordingProxy(answer=502, answer_headers=failing)
    async with failing_proxy as proxy, client_for(sandbox, proxy=proxy.url, trust_env=False) as c:
        with pytest.raises(exc.ProxyError, match="destination_unavailable") as caught:
            await c.users(max_retries=0)
    assert caught.value.status == 502
    assert sandbox.stats.requests == {}


async def test_proxy_credentials_are_used_but_never_shown(
    client_for: ClientFor,
    sandbox: Sandbox,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    async with RecordingProxy(credentials=("corp-user", "s3cret-pw")) as proxy:
        wrong = proxy.url.replace("://", "://corp-user:wr0ng-pw@")
        client = client_for(sandbox, proxy=wrong, trust_env=False)
        async with client:
            with pytest.raises(exc.ProxyError, match="407") as caught:
                await client.users()
        shown = f"{caught.value!r} {caught.value} {client!r} {client.network!r} {caplog.text}"
        assert "wr0ng-pw" not in shown
        assert "<redacted>@127.0.0.1" in repr(client.network)
        right = proxy.url.replace("://", "://corp-user:s3cret-pw@")
        await _export(client_for, sandbox, tmp_path, proxy=right, trust_env=False)
    files = [r for r in proxy.seen if r.target.startswith(sandbox.files_url + "/")]
    assert files
    for request in files:  # the proxy's own credential, never the API token
        assert request.header_names() <= FILE_HEADERS | {"proxy-authorization"}
        assert TOKEN_A.encode() not in request.raw
    assert "s3cret-pw" not in caplog.text


# -- bad options -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad", ["ftp://x:1", "http://", "http://host:99999", "nonsense", "http://[bad", "http://h:x"]
)
def test_malformed_proxy_is_a_configuration_error(bad: str) -> None:
    with pytest.raises(exc.ConfigurationError, match="proxy"):
        network(proxy=bad)


def test_a_malformed_proxy_url_never_shows_its_password() -> None:
    with pytest.raises(exc.ConfigurationError, match="proxy") as caught:
        network(proxy="socks5://me:hunter2@proxy:1080")
    assert "hunter2" not in str(caught.value)


def test_unreadable_ca_bundle_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(exc.ConfigurationError, match="ca_bundle"):
        network(ca_bundle=tmp_path / "missing.pem")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    with pytest.raises(exc.ConfigurationError, match="ca_bundle"):
        network(ca_bundle=junk)


async def test_bad_network_options_fail_before_any_request(sandbox: Sandbox) -> None:
    from lexer_activity_async import LexerClient

    with pytest.raises(exc.ConfigurationError, match="proxy"):
        LexerClient(TOKEN_A, api_url=sandbox.api_url, proxy="nonsense")
    with pytest.raises(exc.ConfigurationError, match="ca_bundle"):
        LexerClient(TOKEN_A, api_url=sandbox.api_url, ca_bundle="/nonexistent/ca.pem")
    assert sandbox.stats.requests == {}


def test_ssl_false_warns() -> None:
    with pytest.warns(UserWarning, match="not verified"):
        assert network(ssl=False).connector_ssl is False


# -- backfills: the spec's proxy and CA bundle on every session ----------------------------


def _spec(sb: Sandbox, output: Path, monkeypatch: pytest.MonkeyPatch, **fields: Any) -> Any:
    monkeypatch.setenv(ENV_A, TOKEN_A)
    monkeypatch.setenv(ENV_B, TOKEN_B)
    return make_spec(sb, output, **fields)


async def test_a_backfill_sends_everything_through_the_specs_proxy(
    sandbox: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _need_tinyproxy()
    with tinyproxy(tmp_path) as (proxy_url, log):
        spec = _spec(sandbox, tmp_path / "out", monkeypatch, proxy=proxy_url)
        summary = await run_backfill(spec, registry=LimiterRegistry())
        text = log.read_text()
    assert summary.ok
    assert summary.done == {"a": 8, "b": 8}  # 2 months x (2 reports + 2 exports)
    for url in (sandbox.api_url, sandbox.status_url, sandbox.files_url):
        assert f"{url}/" in text
    assert text.count(f"{sandbox.files_url}/") >= 4  # two tokens x two export kinds
    assert sandbox.stats.leaks == 0
    assert TOKEN_A not in text
    assert TOKEN_B not in text


async def test_a_backfill_trusts_the_specs_ca_bundle_through_tunnels(
    tls_sandbox: Sandbox, ca_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with RecordingProxy() as proxy:
        spec = _spec(tls_sandbox, tmp_path / "out", monkeypatch, proxy=proxy.url, ca_bundle=ca_file)
        summary = await run_backfill(spec, registry=LimiterRegistry())
    assert summary.ok, summary.failed
    assert {r.method for r in proxy.seen} == {"CONNECT"}
    assert set(proxy.targets()) == {
        _port(tls_sandbox.api_url),
        _port(tls_sandbox.status_url),
        _port(tls_sandbox.files_url),
    }
    assert tls_sandbox.stats.file_requests >= 4
    assert tls_sandbox.stats.leaks == 0


def test_spec_proxy_and_ca_bundle_keys(tmp_path: Path, write_spec: WriteSpec) -> None:
    bundle = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(bundle))
    data = {
        "date_from": "2024-01-01",
        "date_to": "2024-03-01",
        "reports": ["summary"],
        "tokens": [{"label": "a", "env": ENV_A}],
        "proxy": "http://corp:pw-123@proxy.example:3128",
        "ca_bundle": "ca.pem",
    }
    spec = BackfillSpec.from_toml(write_spec(tmp_path / "spec.toml", data))
    assert spec.proxy == data["proxy"]
    assert spec.ca_bundle == bundle
    assert "pw-123" not in repr(spec)
    for key, bad, message in (
        ("proxy", "socks5://corp:pw-123@proxy:1080", "`proxy` must be an http:// URL"),
        ("ca_bundle", "missing.pem", "`ca_bundle` .* cannot be used as a PEM CA bundle"),
    ):
        path = write_spec(tmp_path / "bad.toml", {**data, key: bad})
        with pytest.raises(SpecError, match=message) as caught:
            BackfillSpec.from_toml(path)
        assert "pw-123" not in str(caught.value)


def test_cli_backfill_and_demo_take_proxy_flags(
    tmp_path: Path,
    sandbox_in_thread: SandboxInThread,
    write_spec: WriteSpec,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _need_tinyproxy()
    sb = sandbox_in_thread()
    spec = write_spec(tmp_path / "spec.toml", base_spec(sb, output="out"))
    env = {CLI_ENV_A: TOKEN_A, CLI_ENV_B: TOKEN_B}
    with tinyproxy(tmp_path) as (proxy_url, log):
        result = invoke("backfill", str(spec), "--proxy", proxy_url, "--json", env=env)
        assert result.exit_code == 0, result.output
        backfilled = log.read_text()
        monkeypatch.setenv("LEXER_DEMO_TOKEN_TEAM_A", "")  # the demo sets it; restored after
        demo = ["demo", "--tokens", "1", "--months", "1", "-o", str(tmp_path / "demo")]
        result = invoke(*demo, "--proxy", proxy_url, "--json")
        assert result.exit_code == 0, result.output
        demoed = log.read_text()[len(backfilled) :]
    for url in (sb.api_url, sb.status_url, sb.files_url):
        assert f"{url}/" in backfilled
    for path in ("/v1/", "/api/public/v1/activity/reports/status", "/files/"):
        assert path in demoed
    assert TOKEN_A not in backfilled


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--proxy", "http://me:pw-123@:bad", "--proxy must be an http:// URL"),
        ("--proxy", "http://me:pw-123@[bad", "--proxy must be an http:// URL"),
        ("--ca-bundle", "/nonexistent/ca.pem", "--ca-bundle '/nonexistent/ca.pem' cannot be used"),
    ],
)
@pytest.mark.parametrize("command", ["backfill", "demo"])
def test_cli_bad_proxy_flags_are_usage_errors_before_anything_runs(
    command: str,
    flag: str,
    value: str,
    message: str,
    tmp_path: Path,
    write_spec: WriteSpec,
) -> None:
    spec = write_spec(tmp_path / "spec.toml", base_spec(output="out"))
    args = [str(spec)] if command == "backfill" else ["-o", str(tmp_path / "demo")]
    result = invoke(command, *args, flag, value)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "pw-123" not in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "demo").exists()
