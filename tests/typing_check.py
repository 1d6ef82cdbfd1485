"""Checked by mypy, never run: what `LexerClient.report` and the typed methods return.

``mypy --strict tests/typing_check.py`` fails when a result type drifts from the table
of report kinds (`lexer_activity_async.kinds`)."""

from __future__ import annotations

from datetime import datetime

from typing_extensions import assert_type

from lexer_activity_async import LexerClient, Reports, sync
from lexer_activity_async import models as m
from lexer_activity_async.kinds import ReportResult


async def results(client: LexerClient, start: datetime, end: datetime) -> None:
    assert_type(await client.report(Reports.SUMMARY, start, end), m.Summary)
    assert_type(await client.report(Reports.NPS_VOLUME, start, end, form=1), list[m.NpsDay])
    assert_type(await client.report("summary", start, end), ReportResult)
    assert_type(await client.summary(start, end, users=[1]), m.Summary)
    assert_type(await client.case_volume(start, end), m.CaseVolume)
    assert_type(await client.user_summary(start, end), list[m.UserSummary])
    assert_type(await client.nps_summary(start, end, form=3), m.NpsSummary)
    assert_type(await client.users(), list[m.User])


def blocking(client: sync.LexerClient, start: datetime, end: datetime) -> None:
    """The blocking twin returns the same types, not awaitables."""
    assert_type(client.report(Reports.SUMMARY, start, end), m.Summary)
    assert_type(client.report("summary", start, end), ReportResult)
    assert_type(client.summary(start, end, users=[1]), m.Summary)
    assert_type(client.nps_volume(start, end, form=1), list[m.NpsDay])
    assert_type(client.users(), list[m.User])
    assert_type(client.export_status("job"), m.ExportJob)
    client.summary(start, end, usrs=[1])  # type: ignore[call-arg]
    client.nps_summary(start, end)  # type: ignore[call-arg]


def constructor() -> None:
    """Explicit keyword parameters: a misspelt option is a type error (strict mypy flags
    an ignore that is not needed, so each line below must be an error)."""
    sync.LexerClient("token", proxy="http://proxy:3128", ca_bundle="ca.pem", trust_env=False)
    sync.LexerClient("token", proxi="http://proxy:3128")  # type: ignore[call-arg]
    sync.LexerClient("token", timeout="30")  # type: ignore[arg-type]
