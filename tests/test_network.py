"""Proxy and TLS options: every session goes through a real forward proxy (tinyproxy)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import TOKEN_A, MakeClient
from test_exports import FEB, JAN, POLL
from tinyproxy_server import find_tinyproxy, tinyproxy

from lexer_activity_async import exceptions as exc
from lexer_activity_async.network import network
from lexer_activity_async.sandbox import Sandbox


def _need_tinyproxy() -> None:
    if find_tinyproxy() is None:
        if os.environ.get("CI") == "true":
            pytest.fail("tinyproxy is required under CI=true (apt-get install tinyproxy)")
        pytest.skip("tinyproxy is not installed (apt-get install tinyproxy)")


async def test_api_status_and_file_requests_all_go_through_the_proxy(
    make_client: MakeClient, sandbox: Sandbox, tmp_path: Path
) -> None:
    _need_tinyproxy()
    with tinyproxy(tmp_path) as (proxy_url, log):
        async with make_client(proxy=proxy_url, trust_env=False) as client:
            await client.export("case_details", JAN, FEB, tmp_path / "c.csv", poll=POLL)
        text = log.read_text()
    assert sandbox.stats.file_requests >= 1
    assert f"{sandbox.api_url}/" in text
    assert f"{sandbox.status_url}/" in text
    assert f"{sandbox.files_url}/" in text
    assert TOKEN_A not in text


async def test_a_proxy_that_refuses_is_named(make_client: MakeClient) -> None:
    from redis_server import free_port

    async with make_client(
        proxy=f"http://127.0.0.1:{free_port()}", trust_env=False, retry=None
    ) as client:
        with pytest.raises(exc.LexerConnectionError, match="proxy"):
            await client.users(max_retries=0)


@pytest.mark.parametrize("bad", ["ftp://x:1", "http://", "http://host:99999", "nonsense"])
def test_malformed_proxy_is_a_configuration_error(bad: str) -> None:
    with pytest.raises(exc.ConfigurationError, match="proxy"):
        network(proxy=bad)


def test_unreadable_ca_bundle_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(exc.ConfigurationError, match="ca_bundle"):
        network(ca_bundle=tmp_path / "missing.pem")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    with pytest.raises(exc.ConfigurationError, match="ca_bundle"):
        network(ca_bundle=junk)


def test_ssl_false_warns() -> None:
    with pytest.warns(UserWarning, match="not verified"):
        assert network(ssl=False).connector_ssl is False
