"""The API reference's own curl examples, sent to the sandbox as real HTTP requests.

``reference_examples.json`` holds every curl example of the reference verbatim, with the
answer it documents. Each is parsed as curl would read it, its placeholders filled in
(your token, an NPS survey id, an export's report token and file URL), its host replaced
by the sandbox's, and sent; the answer is checked as the reference documents it: status,
shape, keys, and the values the reference fixes (ids, names, period labels, statuses).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import shlex
from collections.abc import Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import attrs
import pytest

from lexer_activity_async.reports import DEFAULT_WORKFLOW_STATES_TYPE, ExportKind, ReportType
from lexer_activity_async.sandbox import Sandbox, _data

EXAMPLES_FILE = Path(__file__).with_name("reference_examples.json")
REFERENCE = json.loads(EXAMPLES_FILE.read_text("utf-8"))
EXAMPLES: list[dict[str, Any]] = REFERENCE["examples"]
BY_SECTION = {example["section"]: example for example in EXAMPLES}

EXAMPLE_TOKEN = "12345678-1234-1234-1234-123456789"
"""The token the reference's examples spell out; the sandbox accepts it."""
YOUR_TOKEN = "your-own-token-for-the-reference-examples"
"""What ``<TOKEN>`` and ``<API TOKEN>`` stand for."""
PENDING_SECONDS = 30.0

PLACEHOLDER = re.compile(r"^<[^<>]+>$")
TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}[ T]")


@attrs.frozen
class CurlRequest:
    method: str
    url: str
    headers: tuple[tuple[str, str], ...]
    data: str | None


def parse_curl(command: str) -> CurlRequest:
    """The request ``command`` makes, as curl reads the options the reference uses."""
    args = shlex.split(command)
    assert args[0] == "curl", command
    method: str | None = None
    headers: list[tuple[str, str]] = []
    data: str | None = None
    get = False
    urls: list[str] = []
    rest = iter(args[1:])
    for arg in rest:
        if arg == "-H":
            name, colon, value = next(rest).partition(":")
            assert colon, f"header without a colon in {command!r}"
            headers.append((name.strip(), value.strip()))
        elif arg == "-X":
            method = next(rest)
        elif arg == "-d":
            data = next(rest)
        elif arg == "-G":
            get = True
        elif arg.startswith("-"):
            raise AssertionError(f"curl option {arg} is not handled: {command!r}")
        else:
            urls.append(arg)
    assert len(urls) == 1, command
    assert not (get and data is not None), "-G with -d would move the data to the query"
    if data is not None and not any(name.lower() == "content-type" for name, _ in headers):
        headers.append(("Content-Type", "application/x-www-form-urlencoded"))  # as curl does
    if method is None:
        method = "POST" if data is not None else "GET"
    return CurlRequest(method, urls[0], tuple(headers), data)


def fill(command: str, bindings: Mapping[str, str]) -> str:
    for placeholder, value in bindings.items():
        command = command.replace(placeholder, value)
    left = re.findall(r"<[^<>]+>", command)
    assert not left, f"unfilled placeholders {left} in {command!r}"
    return command


def on_sandbox(url: str, sandbox: Sandbox) -> str:
    """``url`` with the published host replaced by the sandbox's; files are already there."""
    bases = {"api": sandbox.api_url, "status": sandbox.status_url}
    for published, origin in REFERENCE["hosts"].items():
        if url.startswith(published + "/"):
            return bases[origin] + url[len(published) :]
    assert url.startswith(sandbox.files_url + "/"), f"{url!r} is on no known host"
    return url


@attrs.frozen
class Answer:
    status: int
    content_type: str
    body: bytes

    def json(self) -> Any:
        assert self.content_type == "application/json", self
        return json.loads(self.body)


async def send(
    session: aiohttp.ClientSession, sandbox: Sandbox, command: str, bindings: Mapping[str, str]
) -> Answer:
    request = parse_curl(fill(command, bindings))
    async with session.request(
        request.method,
        on_sandbox(request.url, sandbox),
        headers=list(request.headers),
        data=None if request.data is None else request.data.encode("utf-8"),
        allow_redirects=False,
    ) as response:
        return Answer(response.status, response.content_type, await response.read())


# -- what the reference documents ------------------------------------------------------


def assert_shaped(
    got: Any,
    documented: Any,
    where: str,
    *,
    nullable: frozenset[str] = frozenset(),
    bindings: dict[str, str] | None = None,
) -> None:
    """``got`` has ``documented``'s shape: the same keys, values of the same JSON types
    (an int where it shows an int), timestamps in the same format; a placeholder string is
    bound on first sight, then must recur unchanged."""
    if isinstance(documented, dict):
        assert isinstance(got, dict), where
        assert set(got) == set(documented), (where, sorted(set(got) ^ set(documented)))
        for key, value in documented.items():
            if key in nullable and got[key] is None:
                continue
            assert_shaped(got[key], value, f"{where}.{key}", nullable=nullable, bindings=bindings)
    elif isinstance(documented, list):
        assert isinstance(got, list), where
        if documented:
            for i, item in enumerate(got):
                assert_shaped(
                    item, documented[0], f"{where}[{i}]", nullable=nullable, bindings=bindings
                )
    elif documented is None:
        assert got is None, where
    elif isinstance(documented, bool):
        assert isinstance(got, bool), where
    elif isinstance(documented, int):
        assert isinstance(got, int), (where, got)
        assert not isinstance(got, bool), (where, got)
    elif isinstance(documented, float):
        assert isinstance(got, (int, float)), (where, got)
        assert not isinstance(got, bool), (where, got)
        assert math.isfinite(got), (where, got)
    else:
        assert isinstance(documented, str)
        assert isinstance(got, str), (where, got)
        if PLACEHOLDER.match(documented) and bindings is not None:
            assert got, where
            assert bindings.setdefault(documented, got) == got, (where, documented)
        elif TIMESTAMP.match(documented):
            pattern = re.sub(r"\d", r"\\d", re.escape(documented))
            assert re.fullmatch(pattern, got), (where, got, documented)


def items(value: Any, inside: str | None = None) -> list[Any]:
    value = value[inside] if inside is not None else value
    return value if isinstance(value, list) else [value]


def objects(answer: Any) -> Iterator[dict[str, Any]]:
    yield from (answer if isinstance(answer, list) else [answer])


def check_answer(
    step: dict[str, Any],
    answer: Any,
    documented: Any,
    bindings: dict[str, str] | None = None,
) -> None:
    """The documented shape and every check the step lists (see the file's ``checks``);
    placeholders in a documented object (an export's report token) bind in ``bindings``."""
    nullable = frozenset(step.get("nullable", ()))
    kind = step["answer"]
    if kind == "object":
        assert_shaped(answer, documented, "$", nullable=nullable, bindings=bindings)
    elif kind == "list":
        assert isinstance(answer, list)
        assert answer
        assert_shaped(answer, documented, "$", nullable=nullable)
    elif kind == "list_of_documented":
        assert isinstance(answer, list)
        assert answer
        assert_shaped(answer, [documented], "$", nullable=nullable)
    else:
        assert kind == "series", kind
        assert isinstance(answer, dict)
        assert set(documented) <= set(answer), sorted(answer)
        point = next(iter(documented.values()))[0]
        for name, series in answer.items():
            assert isinstance(series, list), name
            assert series, name
            assert_shaped(series, [point], f"$.{name}")
            if step.get("series_state"):
                assert {p["state"] for p in series} == {name}

    if "includes" in step:
        where, fields = step["includes"].get("in"), step["includes"]["fields"]
        have = [{f: item[f] for f in fields} for item in items(answer, where)]
        for item in items(documented, where):
            assert {f: item[f] for f in fields} in have, (fields, item)
    for partial in step.get("also_includes", ()):
        assert any(partial.items() <= item.items() for item in answer), partial
    if "same_where" in step:
        key, fields = step["same_where"]["key"], step["same_where"]["fields"]
        known = {item[key]: {f: item[f] for f in fields} for item in documented}
        for item in answer:
            if item[key] in known:
                assert {f: item[f] for f in fields} == known[item[key]], item
    for field, numerator, denominator in step.get("quotients", ()):
        for obj in objects(answer):
            below = denominator if isinstance(denominator, (int, float)) else obj[denominator]
            if below:
                assert obj[field] == pytest.approx(obj[numerator] / below, rel=1e-9), field
    for fields in step.get("order", ()):
        values = [answer[f] for f in fields]
        assert values == sorted(values), fields
    for check in step.get("checks", ()):
        CHECKS[check](answer)


def _all_states_is_the_total(answer: list[dict[str, Any]]) -> None:
    by_id: dict[int, list[dict[str, Any]]] = {}
    for row in answer:
        by_id.setdefault(row["classification_id"], []).append(row)
    for rows in by_id.values():
        [total] = [r["volume"] for r in rows if r["state"] == "all_states"]
        assert total == sum(r["volume"] for r in rows if r["state"] != "all_states")


def _nps_counts_partition_received(answer: Any) -> None:
    for counts in [a["data"] for a in answer] if isinstance(answer, list) else [answer]:
        parts = counts["total_promoters"] + counts["total_passives"] + counts["total_detractors"]
        assert parts == counts["total_received"] <= counts["total_sent"]


def _timestamp_is_date(answer: list[dict[str, Any]]) -> None:
    for day in answer:
        assert datetime.fromisoformat(day["date"]).timestamp() == day["timestamp"]


CHECKS = {
    "all_states_is_the_total": _all_states_is_the_total,
    "nps_counts_partition_received": _nps_counts_partition_received,
    "timestamp_is_date": _timestamp_is_date,
}


# -- running them ------------------------------------------------------------------------


class Clock:
    """The sandbox's monotonic clock, moved by hand (export jobs complete on it)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def reference_sandbox(sandbox_factory: Any) -> tuple[Sandbox, Clock]:
    clock = Clock()
    sandbox: Sandbox = await sandbox_factory(
        tokens=frozenset({EXAMPLE_TOKEN, YOUR_TOKEN}),
        max_requests=100,  # the documented limit; all the examples fit in one window
        export_pending_seconds=PENDING_SECONDS,
        export_rows=25,
        clock=clock,
    )
    return sandbox, clock


async def _nps_survey_id(session: aiohttp.ClientSession, sandbox: Sandbox) -> str:
    """What a reader puts for ``<FORM ID>``: an NPS survey from the Forms example."""
    answer = await send(session, sandbox, BY_SECTION["Forms"]["steps"][0]["curl"], {})
    return str(next(form["id"] for form in answer.json() if form["nps"]))


@pytest.mark.parametrize("example", EXAMPLES, ids=[e["section"] for e in EXAMPLES])
async def test_the_references_example_answers_as_documented(
    reference_sandbox: tuple[Sandbox, Clock], example: dict[str, Any]
) -> None:
    sandbox, clock = reference_sandbox
    bindings = {"<TOKEN>": YOUR_TOKEN, "<API TOKEN>": YOUR_TOKEN}
    async with aiohttp.ClientSession() as session:
        if any("<FORM ID>" in step["curl"] for step in example["steps"]):
            bindings["<FORM ID>"] = await _nps_survey_id(session, sandbox)
        for step in example["steps"]:
            if step["answer"] == "csv":
                await _check_download(session, sandbox, step, bindings)
            elif "pending" in step:
                await _check_status_polls(session, sandbox, clock, step, bindings)
            else:
                answer = await send(session, sandbox, step["curl"], bindings)
                assert answer.status == 200, answer
                body = answer.json()
                if "as_published" in step:
                    await _check_retyped(session, sandbox, step, bindings, body)
                else:
                    check_answer(step, body, step["documented"], bindings)

    assert sandbox.stats.unauthorized == 0
    assert sandbox.stats.rate_limited == 0
    assert sandbox.stats.leaks == 0


async def _check_status_polls(
    session: aiohttp.ClientSession,
    sandbox: Sandbox,
    clock: Clock,
    step: dict[str, Any],
    bindings: dict[str, str],
) -> None:
    """Step 2: pending while the job runs; then complete, with the file's URL."""
    report_token = bindings["<report_token>"]
    early = await send(session, sandbox, step["curl"], bindings)
    assert early.status == 200
    assert_shaped(early.json(), step["pending"], "$", bindings=bindings)
    assert early.json()["status"] == "pending"

    await sandbox._store.jobs[report_token].file  # the file is generated ...
    clock.now += PENDING_SECONDS  # ... and the job's time has passed
    done = await send(session, sandbox, step["curl"], bindings)
    assert done.status == 200
    check_answer(step, done.json(), step["documented"], bindings)
    assert done.json()["status"] == "complete"
    assert bindings["<report_token>"] == report_token
    assert sandbox.stats.status_polls == {report_token: 2}


async def _check_download(
    session: aiohttp.ClientSession,
    sandbox: Sandbox,
    step: dict[str, Any],
    bindings: dict[str, str],
) -> None:
    """Step 3: the file location serves a CSV file, fetched with no header at all."""
    assert parse_curl(fill(step["curl"], bindings)).headers == ()
    answer = await send(session, sandbox, step["curl"], bindings)
    assert answer.status == 200
    assert answer.content_type == "text/csv"
    records = list(csv.reader(io.StringIO(answer.body.decode("utf-8-sig"), newline="")))
    header, rows = records[0], records[1:]
    assert header
    assert all(header)
    assert len(rows) == sandbox.config.export_rows
    assert {len(row) for row in rows} == {len(header)}


async def _check_retyped(
    session: aiohttp.ClientSession,
    sandbox: Sandbox,
    step: dict[str, Any],
    bindings: dict[str, str],
    published_answer: Any,
) -> None:
    """The Workflow States example sends Team Volume's type: as published it answers Team
    Volume's shape; with the workflow-state type it answers its own documented shape."""
    twin = BY_SECTION[step["as_published"]]["steps"][0]
    assert (
        json.loads(parse_curl(step["curl"]).data or "")["type"]
        == json.loads(parse_curl(twin["curl"]).data or "")["type"]
    )
    check_answer(twin, published_answer, twin["documented"])

    assert step["retype"] == DEFAULT_WORKFLOW_STATES_TYPE == sandbox.config.workflow_states_type
    published = parse_curl(step["curl"])
    body = json.loads(published.data or "")
    retyped = step["curl"].replace(published.data or "", json.dumps({**body, "type": "states"}))
    answer = await send(session, sandbox, retyped, bindings)
    assert answer.status == 200
    check_answer(step, answer.json(), step["documented"])


# -- the copy itself ---------------------------------------------------------------------


FILE_LOCATION = "https://files.example.invalid/export.csv"
"""Stands in for ``<CSV File Location>`` (which curl would split into three words)."""


def _published() -> list[CurlRequest]:
    return [
        parse_curl(step["curl"].replace("<CSV File Location>", FILE_LOCATION))
        for example in EXAMPLES
        for step in example["steps"]
    ]


def test_the_copy_holds_every_example_and_each_parses_as_curl() -> None:
    requests = _published()
    assert len(requests) == 24
    hosts = tuple(REFERENCE["hosts"])
    for request in requests:
        assert request.url.startswith(hosts) or request.url == FILE_LOCATION, request
        assert request.method in ("GET", "POST")
        if request.data is not None:
            assert json.loads(request.data.replace("<FORM ID>", "1"))["type"]
        tokens = [value for name, value in request.headers if name == "Auth-Api-Token"]
        assert tokens in ([EXAMPLE_TOKEN], ["<TOKEN>"], ["<API TOKEN>"], []), request
    assert sum(r.url == FILE_LOCATION and r.headers == () for r in requests) == 3


def test_the_examples_cover_every_documented_type() -> None:
    sent = {
        json.loads(request.data.replace("<FORM ID>", "1"))["type"]
        for request in _published()
        if request.data is not None
    }
    documented = {t.value for t in ReportType} | {k.value for k in ExportKind}
    # Workflow States is published with Team Volume's type; see `_check_retyped`.
    assert sent == documented - {DEFAULT_WORKFLOW_STATES_TYPE}


def test_the_sandbox_world_holds_the_ids_the_examples_use() -> None:
    """Users, groups, forms and classification names agree with every example that shows
    them, so the examples work as written."""
    users = {user["id"]: user for user in _data.USERS}
    for example in ("Team Summary", "Team Volume"):
        for row in BY_SECTION[example]["steps"][0]["documented"]:
            user = users[int(row["user_id"])]
            assert (user["first_name"], user["last_name"]) == (row["first_name"], row["last_name"])
    documented_user = BY_SECTION["Users"]["steps"][0]["documented"]
    assert set(documented_user["groups"]) <= {group["id"] for group in _data.GROUPS}
    assert documented_user["id"] in users
    assert 123 in _data.NPS_FORM_IDS  # the NPS examples' "form": 123
    assert BY_SECTION["Forms"]["steps"][0]["documented"]["id"] in _data.NPS_FORM_IDS
    names = dict(_data.CLASSIFICATIONS)
    for example in ("Classifications (Messages)", "Case Classifications"):
        for row in BY_SECTION[example]["steps"][0]["documented"]:
            assert names[row["classification_id"]] == row["classification"]
