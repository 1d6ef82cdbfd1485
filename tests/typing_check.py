"""Checked by mypy, never run: what `LexerClient.report` and the typed methods return.

``mypy --strict tests/typing_check.py`` fails when a result type drifts from the table
of report kinds (`lexer_activity_async.kinds`)."""

from __future__ import annotations

from datetime import datetime

from typing_extensions import assert_type

from lexer_activity_async import LexerClient, Reports
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
