"""The backfill spec: what to fetch, for which tokens, over which range, into which
folder, and how runs on a schedule treat recent windows (``settle``, ``lookback``).

A spec comes from TOML (`BackfillSpec.from_toml`, structured by one cattrs converter) or
Python; attrs validators check every field either way. Every name that becomes part of
a file path (token labels, report types) is checked for safety and uniqueness, so a bad
spec raises `SpecError` naming the key before any request is sent.
"""

from __future__ import annotations

import importlib
import math
import os
import re
import sys
from collections.abc import Callable, Mapping
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, NewType, TypeGuard
from urllib.parse import urlsplit

import attrs
import cattrs
from cattrs import BaseConverter
from cattrs.cols import list_structure_factory
from cattrs.errors import ForbiddenExtraKeysError
from cattrs.gen import make_dict_structure_fn

from .. import exceptions as exc
from ..exports import MAX_CONNECTIONS, DownloadPolicy, PollPolicy
from ..limits import DEFAULT_MAX_REQUESTS, DEFAULT_WINDOW, default_reserve
from ..network import network, redact_url
from ..reports import (
    DEFAULT_WORKFLOW_STATES_TYPE,
    ExportKind,
    NpsCategory,
    ReportType,
    add_months,
    validate_nps,
)
from ..sinks import FORMATS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "SpecError",
    "TokenSource",
    "ExportSpec",
    "BackfillSpec",
    "ALL_REPORTS",
    "EXPORT_FORMATS",
    "MAX_NAME_LENGTH",
    "check_name",
    "check_spans",
    "parse_duration",
    "DEFAULT_SETTLE",
    "run_identity",
]

ALL_REPORTS = tuple(k.value for k in ReportType)
EXPORT_FORMATS = ("csv", "parquet")
"""How export units are written: the CSV as downloaded, or typed Parquet from it."""
DEFAULT_SETTLE = timedelta(days=2)
"""Windows ending within this of now are provisional unless the spec sets `settle`."""
MAX_RELATIVE = timedelta(days=366 * 50)
"""Longest relative `date_from`, `settle` or `lookback`."""
MAX_NAME_LENGTH = 100
"""Most characters in a token label or report type name (each becomes a folder name)."""
_ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]{0,63}")
# Refused in names: path separators and what Windows or macOS file systems refuse.
_UNSAFE_CHARS = frozenset('/\\:*?"<>|')


class SpecError(exc.ValidationError):
    """The backfill spec is invalid; the message says where and why."""


@attrs.frozen
class TokenSource:
    """Where a token's secret comes from: an environment variable or a file. The spec
    names the source only, so tokens never appear on a command line or in the spec."""

    label: str
    env: str | None = None
    file: Path | None = None

    def read(self) -> str:
        if self.env is not None:
            raw = os.environ.get(self.env)
            value = (raw or "").strip()
            if not value:
                # Name the variable only if it looks like one: a token pasted into `env`
                # by mistake must not be echoed.
                shown = self.env if _ENV_NAME.fullmatch(self.env) else "named in `env`"
                state = "unset" if raw is None else "empty" if not raw else "only whitespace"
                raise SpecError(f"token {self.label!r}: environment variable {shown} is {state}")
            return value
        assert self.file is not None
        try:
            raw = self.file.read_text(encoding="utf-8")
        except OSError as error:
            raise SpecError(
                f"token {self.label!r}: cannot read {self.file}: {error.strerror}"
            ) from None
        except (ValueError, UnicodeError):
            raise SpecError(f"token {self.label!r}: {self.file} is not UTF-8 text") from None
        value = raw.strip()
        if not value:
            state = "is empty" if not raw else "is empty but for whitespace"
            raise SpecError(f"token {self.label!r}: token file {self.file} {state}")
        return value


@attrs.frozen
class ExportSpec:
    kind: ExportKind
    form: int | None = None
    nps_category: str | None = None


@attrs.frozen(kw_only=True)
class BackfillSpec:
    """What to backfill. Build it directly or with `BackfillSpec.from_toml`; every field
    is checked on construction (`SpecError` naming the key)."""

    tokens: tuple[TokenSource, ...] = attrs.field(validator=lambda _s, _a, v: _check_tokens(v))
    date_from: datetime | timedelta
    """A moment, or a negative `timedelta`: that long before each run's "now", rounded
    down to the window grid (see `plan`)."""
    date_to: datetime | None = None
    """A moment, or None for each run's "now"; a moment in the future is clipped to now."""
    output: Path = attrs.field(validator=lambda _s, _a, v: _check_output(v))
    reports: tuple[str, ...] = ALL_REPORTS
    exports: tuple[ExportSpec, ...] = ()
    export_format: str = attrs.field(
        default="csv", validator=lambda _s, _a, v: _check_export_format(v)
    )
    """``[exports] format``: ``"csv"``, or ``"parquet"`` (typed columns, `csv_parquet`)."""
    keep_csv: bool = attrs.field(default=False, validator=lambda _s, _a, v: _check_keep_csv(v))
    """``[exports] keep_csv``: with Parquet, keep the downloaded CSV beside it."""
    nps_form: int | None = None
    nps_category: str = NpsCategory.ALL.value
    window_months: int = attrs.field(default=1, validator=lambda _s, _a, v: _check_months(v))
    export_window_months: int | None = attrs.field(
        default=None, validator=lambda _s, a, v: _check_months(v, a.name, optional=True)
    )
    """Months per export window; None: `window_months`. Fewer, longer export jobs cost
    fewer requests (each job is a start and its status polls)."""
    export_connections: int = attrs.field(
        default=1, validator=lambda _s, _a, v: _check_connections(v)
    )
    """``[exports] connections`` (1-32): concurrent byte ranges per export file, on a file
    host that serves them (others get one stream); see `DownloadPolicy.connections`."""
    per_token_concurrency: int = attrs.field(default=8, validator=lambda _s, _a, v: _check_cap(v))
    total_concurrency: int = attrs.field(default=64, validator=lambda _s, _a, v: _check_cap(v))
    api_url: str | None = attrs.field(default=None, validator=lambda _s, a, v: _check_http(a, v))
    status_url: str | None = attrs.field(default=None, validator=lambda _s, a, v: _check_http(a, v))
    max_requests: int = attrs.field(
        default=DEFAULT_MAX_REQUESTS, validator=lambda _s, _a, v: _check_rate(v, 1.0)
    )
    window: float = attrs.field(
        default=DEFAULT_WINDOW, validator=lambda _s, _a, v: _check_rate(1, v)
    )
    reserve: int | None = attrs.field(
        default=None, validator=lambda s, _a, v: _check_reserve(v, s.max_requests)
    )
    """Slots of each window the backfill (bulk work) leaves to interactive calls of its
    tokens; None: 10 % of ``max_requests``."""
    redis_url: str | None = attrs.field(
        default=None,
        validator=lambda _s, _a, v: _check_url("redis_url", v, ("redis", "rediss", "unix")),
    )
    limit_store: Path | str | None = attrs.field(
        default=None, validator=lambda _s, _a, v: _check_limit_store(v)
    )
    """A local limit-store file (`limits_sqlite`), or ``"memory"`` for in-process only."""
    checkpoint_url: str | None = attrs.field(
        default=None, validator=lambda _s, _a, v: _check_checkpoint_url(v)
    )
    """A ``postgresql://`` database for the checkpoint (and the workers' queue) instead of
    the SQLite file in the output folder."""
    workflow_states_type: str = DEFAULT_WORKFLOW_STATES_TYPE
    poll: PollPolicy = attrs.field(
        factory=PollPolicy, validator=lambda _s, _a, v: _check_poll("[poll]", v)
    )
    settle: timedelta | None = attrs.field(
        default=None, validator=lambda _s, a, v: _check_span(a.name, v)
    )
    """How long after its end a window's data may still change: windows ending later than
    now minus this are provisional, refetched by every run. None: `DEFAULT_SETTLE`."""
    lookback: timedelta = attrs.field(
        default=timedelta(0), validator=lambda _s, a, v: _check_span(a.name, v)
    )
    """Windows that ended within this span before now are refetched by every run."""
    format: str = attrs.field(default="json", validator=lambda _s, _a, v: _check_format(v))
    """How reports are written: ``json``, ``raw``, ``parquet`` or ``duckdb`` (`sinks`)."""
    # net-sync: the proxy and CA bundle of every session of the run (API, status, files)
    proxy: str | None = attrs.field(
        default=None,
        validator=lambda _s, _a, v: _check_proxy(v),
        repr=lambda v: repr(redact_url(v)),
    )
    """An ``http://`` forward proxy; None: ``$HTTPS_PROXY``/``$HTTP_PROXY``/``$NO_PROXY``."""
    ca_bundle: Path | None = attrs.field(
        default=None, validator=lambda _s, _a, v: _check_ca_bundle(v)
    )
    """A PEM file of CAs to trust instead of the system's (relative to the spec file)."""

    @property
    def settle_period(self) -> timedelta:
        """`settle`, or `DEFAULT_SETTLE` when unset."""
        return DEFAULT_SETTLE if self.settle is None else self.settle

    @property
    def download_policy(self) -> DownloadPolicy:
        """How export files are downloaded: `DownloadPolicy` with `export_connections`."""
        return DownloadPolicy(connections=self.export_connections)

    @property
    def bulk_max_requests(self) -> int:
        """The requests per window the backfill may send: it runs as bulk work, so
        ``max_requests`` less the reserve (`reserve`, else 10 %)."""
        reserve = default_reserve(self.max_requests) if self.reserve is None else self.reserve
        return self.max_requests - reserve

    def __attrs_post_init__(self) -> None:
        if self.limit_store is not None and self.redis_url is not None:
            raise SpecError("give either `redis_url` or `limit_store`, not both")
        _check_dates(self)
        _check_reports(self)
        _check_exports(self)

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str], **overrides: Any) -> BackfillSpec:
        """Read a spec file; relative paths in it are relative to the file."""
        source = Path(path)
        try:
            data = tomllib.loads(source.read_text(encoding="utf-8"))
        except OSError as error:
            raise SpecError(f"cannot read spec {source}: {error.strerror}") from None
        except UnicodeDecodeError:
            raise SpecError(f"{source} is not UTF-8 text") from None
        except tomllib.TOMLDecodeError as error:
            raise SpecError(f"{source} is not valid TOML: {error}") from None
        return cls.from_dict(data, base_dir=source.parent, **overrides)

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], *, base_dir: Path = Path("."), **overrides: Any
    ) -> BackfillSpec:
        """Build a spec from parsed TOML (see the README for every key)."""
        fields = _spec_fields(data, base_dir)
        fields.update(overrides)
        try:
            return cls(**fields)
        except TypeError as error:
            raise SpecError(f"invalid spec: {error}") from None


# -- names that become paths ------------------------------------------------------------


def check_name(what: str, name: object) -> str:
    """``name`` if it is safe as one folder name on every common file system, else
    `SpecError` saying why: 1 to `MAX_NAME_LENGTH` printable characters, none of
    ``/ \\ : * ? " < > |``, not starting with a dot nor ending with a dot or a space."""
    if not isinstance(name, str):
        raise SpecError(f"{what} must be a string, got {shown(name)}")
    why = None
    if not name:
        why = "it is empty"
    elif len(name) > MAX_NAME_LENGTH:
        why = f"it is {len(name)} characters long (at most {MAX_NAME_LENGTH})"
    elif not name.isprintable():
        why = "it contains a control or other non-printable character"
    elif _UNSAFE_CHARS.intersection(name):
        why = f"it contains one of {' '.join(sorted(_UNSAFE_CHARS))}"
    elif name.startswith("."):
        why = "it starts with a dot"
    elif name.endswith((".", " ")):
        why = "it ends with a dot or a space"
    if why is not None:
        raise SpecError(f"{what} {name!r} must be a plain file-name-safe name: {why}")
    return name


def _check_tokens(tokens: object) -> None:
    if not isinstance(tokens, tuple) or not tokens:
        raise SpecError("spec needs at least one token")
    folded: dict[str, str] = {}
    for source in tokens:
        check_name("token label", source.label)
        if (source.env is None) == (source.file is None):
            raise SpecError(f"token {source.label!r} needs exactly one of `env` or `file`")
        # Case-insensitive file systems (macOS, Windows) would merge "Care" and "care".
        key = source.label.casefold()
        if key in folded:
            raise SpecError(
                f"token labels must be unique, ignoring case: {folded[key]!r} and "
                f"{source.label!r} would share a folder"
            )
        folded[key] = source.label


def _check_output(output: object) -> None:
    if not isinstance(output, Path) or "\0" in str(output):
        raise SpecError("output must be a path without NUL characters")


def _check_export_format(name: object) -> None:
    if name not in EXPORT_FORMATS:
        raise SpecError('[exports] format must be "csv" or "parquet"')
    if name == "parquet":
        try:  # the extra is checked here, before any request
            importlib.import_module("lexer_activity_async.csv_parquet")
        except ImportError as error:
            raise SpecError(f'[exports] format = "parquet": {error}') from None


def _check_keep_csv(keep: object) -> None:
    if not isinstance(keep, bool):
        raise SpecError("[exports] keep_csv must be true or false")


def _check_format(format: object) -> None:
    if format not in FORMATS:
        got = repr(format) if isinstance(format, str) and len(format) <= 20 else shown(format)
        raise SpecError(f"`format` must be one of {', '.join(FORMATS)}, got {got}")


def _check_connections(connections: object, key: str = "[exports] connections") -> None:
    if not _is_int(connections) or not 1 <= connections <= MAX_CONNECTIONS:
        raise SpecError(f"{key} must be an integer from 1 to {MAX_CONNECTIONS}")


def _check_months(months: object, key: str = "window_months", optional: bool = False) -> None:
    if optional and months is None:
        return
    if not _is_int(months) or not 1 <= months <= 12:
        raise SpecError(f"{key} must be 1 to 12")


def _check_cap(cap: object) -> None:
    if not _is_int(cap) or cap < 1:
        raise SpecError("concurrency caps must be at least 1")


def _check_rate(max_requests: object, window: object) -> None:
    if (
        not _is_int(max_requests)
        or max_requests < 1
        or not _is_number(window)
        or not 0 < window < math.inf
    ):
        raise SpecError("rate_limit needs max_requests >= 1 and window > 0")


def _check_reserve(reserve: object, max_requests: int) -> None:
    if reserve is not None and (not _is_int(reserve) or not 0 <= reserve < max_requests):
        raise SpecError(
            f"[rate_limit] reserve must be 0 to max_requests - 1 ({max_requests - 1}), "
            f"got {shown(reserve)}"
        )


def _check_http(field: attrs.Attribute[Any], url: object) -> None:
    _check_url(field.name, url, ("http", "https"))


def _check_span(key: str, span: object) -> None:
    if span is None:
        return
    if not isinstance(span, timedelta) or span < timedelta(0) or span > MAX_RELATIVE:
        raise SpecError(f"`{key}` must be a duration from 0 to {MAX_RELATIVE.days} days")


def _check_dates(spec: BackfillSpec) -> None:
    start, end = spec.date_from, spec.date_to
    if isinstance(start, timedelta):
        if not -MAX_RELATIVE <= start < timedelta(0):
            raise SpecError(
                f"date_from: a relative date_from must be before now, by at most "
                f'{MAX_RELATIVE.days} days (like "-90d")'
            )
    elif not isinstance(start, datetime) or start.tzinfo is None:
        raise SpecError("date_from and date_to need a UTC offset")
    if end is None:
        return
    if not isinstance(end, datetime) or end.tzinfo is None:
        raise SpecError("date_from and date_to need a UTC offset")
    if isinstance(start, datetime):
        if start >= end:
            raise SpecError("date_from must be before date_to")
        check_spans(spec, end - start)
    try:  # the planner's last window may end up to a window after date_to
        add_months(
            end.astimezone(timezone.utc), max(spec.window_months, spec.export_window_months or 1)
        )
    except (ValueError, OverflowError):
        raise SpecError("date_to is too late to plan windows after it") from None


def check_spans(spec: BackfillSpec, span: timedelta) -> None:
    """`SpecError` if an explicit `settle`, or the `lookback`, is longer than the range
    (``span``): every window would be provisional, or refetched on every run."""
    for key, value in (("settle", spec.settle), ("lookback", spec.lookback)):
        if value is not None and value > span:
            raise SpecError(
                f"`{key}` ({_span_text(value)}) is longer than the range ({_span_text(span)})"
            )


def _span_text(span: timedelta) -> str:
    hours = span.total_seconds() / 3600
    return f"{hours / 24:g} days" if hours >= 24 else f"{hours:g} hours"


def _check_reports(spec: BackfillSpec) -> None:
    wst = check_name("workflow_states_type", spec.workflow_states_type)
    taken = (set(ALL_REPORTS) - {DEFAULT_WORKFLOW_STATES_TYPE}) | {k.value for k in ExportKind}
    if wst in taken:
        raise SpecError(
            f"workflow_states_type {wst!r} is already the name of another report or export"
        )
    known = set(ALL_REPORTS) | {wst}
    for name in spec.reports:
        if name not in known:
            raise SpecError(f"unknown report {name!r}; known: {', '.join(sorted(known))}")
    if len(set(spec.reports)) != len(spec.reports):
        twice = sorted({r for r in spec.reports if spec.reports.count(r) > 1})
        raise SpecError(f"reports listed twice (they would write the same files): {twice}")
    if not spec.reports and not spec.exports:
        raise SpecError("the spec fetches nothing: list at least one report or export")
    if any(r in ("nps_summary", "nps_volume") for r in spec.reports):
        try:
            validate_nps(spec.nps_form, spec.nps_category)
        except exc.ValidationError as error:
            raise SpecError(f"[nps] form/category for NPS reports: {error}") from None


def _check_exports(spec: BackfillSpec) -> None:
    kinds: set[ExportKind] = set()
    for item in spec.exports:
        if item.kind in kinds:
            raise SpecError(
                f"export {item.kind.value} listed twice: both would write "
                f"<label>/exports/{item.kind.value}/<window>.csv"
            )
        kinds.add(item.kind)
        if item.kind.needs_form:
            try:
                validate_nps(item.form, item.nps_category or NpsCategory.ALL.value)
            except exc.ValidationError as error:
                raise SpecError(f"export {item.kind.value}: {error}") from None


def _check_poll(where: str, poll: PollPolicy) -> None:
    """Every delay finite and non-negative, the growth at least 1, the jitter in (0, 1]."""
    rules = {
        "first_delay": (0.0, False),
        "factor": (1.0, False),
        "cap": (0.0, False),
        "jitter_low": (0.0, True),
        "timeout": (0.0, True),
    }
    for key, (low, strict) in rules.items():
        value = getattr(poll, key)
        if not _is_number(value) or not math.isfinite(value):
            raise SpecError(f"{where} {key} must be a finite number, got {shown(value)}")
        if value < low or (strict and value == low):
            bound = f"> {low:g}" if strict else f">= {low:g}"
            raise SpecError(f"{where} {key} must be {bound}, got {value!r}")
    if poll.jitter_low > 1:
        raise SpecError(f"{where} jitter_low must be at most 1, got {poll.jitter_low!r}")


def _check_limit_store(store: object) -> None:
    if store is not None and (not isinstance(store, (str, Path)) or str(store) in ("", ".")):
        raise SpecError(f'`limit_store` must be a file path or "memory", got {shown(store)}')


def _check_proxy(proxy: object) -> None:
    if proxy is None:
        return
    if not isinstance(proxy, str):
        raise SpecError(f"`proxy` must be a string, got {shown(proxy)}")
    try:
        network(proxy=proxy, trust_env=False)
    except exc.ConfigurationError as error:
        raise SpecError(_keyed("proxy", error)) from None


def _check_ca_bundle(path: object) -> None:
    if path is None:
        return
    if not isinstance(path, (str, Path)):
        raise SpecError(f"`ca_bundle` must be a file path, got {shown(path)}")
    try:
        network(ca_bundle=path, trust_env=False)
    except exc.ConfigurationError as error:
        raise SpecError(_keyed("ca_bundle", error)) from None


def _keyed(key: str, error: exc.ConfigurationError) -> str:
    """``network``'s message ("proxy must be ..."), with the key as the spec writes it."""
    text = str(error)
    return f"`{key}`{text[len(key) :]}" if text.startswith(key + " ") else text


def _check_url(key: str, url: object, schemes: tuple[str, ...]) -> None:
    if url is None:
        return
    if not isinstance(url, str):
        raise SpecError(f"`{key}` must be a string, got {shown(url)}")
    try:
        parts = urlsplit(url)
        host = parts.hostname if parts.scheme != "unix" else parts.path
    except ValueError:  # e.g. a bad IPv6 literal or port
        host = None
    if not url.isprintable() or " " in url or not host or parts.scheme not in schemes:
        raise SpecError(f"`{key}` must be a {'/'.join(schemes)} URL, got {url!r}")


def _check_checkpoint_url(url: object) -> None:
    """A postgresql:// URL (the host may be left to libpq); never echoed, it may hold a
    password."""
    if url is None:
        return
    if not isinstance(url, str):
        raise SpecError(f"`checkpoint_url` must be a string, got {shown(url)}")
    try:
        scheme = urlsplit(url).scheme
    except ValueError:
        scheme = ""
    if not url.isprintable() or " " in url or scheme not in ("postgresql", "postgres"):
        raise SpecError("`checkpoint_url` must be a postgresql:// URL")


# The keys that decide which files a run writes, and what is in them: workers sharing a
# checkpoint database must agree on every one (see `run_identity`).
_IDENTITY_KEYS = (
    "tokens",
    "date_from",
    "date_to",
    "reports",
    "exports",
    "nps_form",
    "nps_category",
    "window_months",
    "workflow_states_type",
    "settle",
    "lookback",
    "max_requests",
    "window",
)

# Keys that decide files too but came after the first release of shared checkpoints: in
# the identity only when not at their default, so a database written before still matches.
_LATER_IDENTITY_KEYS: dict[str, object] = {
    "export_window_months": None,
    "export_format": "csv",
    "keep_csv": False,
    "format": "json",
}


def run_identity(spec: BackfillSpec) -> dict[str, str]:
    """The spec's identity for a shared checkpoint: each key deciding the units and
    their files, as text. Not the output folder, URLs or caps, which may differ by host."""
    values: dict[str, object] = {
        "tokens": [source.label for source in spec.tokens],
        "exports": [[e.kind.value, e.form, e.nps_category] for e in spec.exports],
    }
    identity = {
        key: str(values[key] if key in values else getattr(spec, key)) for key in _IDENTITY_KEYS
    }
    for key, default in _LATER_IDENTITY_KEYS.items():
        if getattr(spec, key) != default:
            identity[key] = str(getattr(spec, key))
    return identity


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def shown(value: object) -> str:
    """A value for an error message: numbers as they are, anything else by its type only
    (a string in the wrong place might be a pasted secret)."""
    if isinstance(value, (bool, int, float)):
        return f"{type(value).__name__} {value!r}"
    names = {str: "a string", list: "a list", datetime: "a datetime", date: "a date"}
    if isinstance(value, Mapping):
        return "a table"
    return names.get(type(value), f"a {type(value).__name__}")


# -- structuring parsed TOML: one cattrs converter ---------------------------------------
#
# The TOML document is structured into the private classes below, shaped like the file
# (tables as classes, arrays as lists) by a converter that forbids extra keys and whose
# scalar hooks accept exactly the TOML type asked for (no "2" for 2, no true for 1).
# `cattrs.transform_error` then gives each failure with its path (``$.concurrency.total``),
# which `_message` words as the user reads the file (``[concurrency] total``).


class _Invalid(ValueError):
    """A value of the wrong type or form; ``text`` follows the key's name in the message
    (after ``sep``), and never holds a string value (it might be a pasted secret)."""

    def __init__(self, text: str, sep: str = " ") -> None:
        super().__init__(text)
        self.text = text
        self.sep = sep


_PathText = NewType("_PathText", str)
"""A string naming a path: non-empty, no NUL."""
_ReportNames = NewType("_ReportNames", tuple[str, ...])
"""``"all"``, one report name, or a list of them."""


@attrs.define
class _TokenDoc:
    label: str
    env: str | None = None
    file: _PathText | None = None


@attrs.define
class _ExportDoc:
    kind: ExportKind
    form: int | None = None
    nps_category: str | None = None


_Format = NewType("_Format", str)
"""``[exports] format``: "csv" or "parquet"."""


@attrs.define
class _ExportsDoc:
    """``exports``: a list of exports, or an ``[exports]`` table holding them (``kinds``)
    and how they are written."""

    kinds: list[_ExportDoc] = attrs.Factory(list)
    format: _Format = _Format("csv")
    keep_csv: bool = False
    window_months: int | None = None
    connections: int | None = None


@attrs.define
class _NpsDoc:
    form: int | None = None
    category: str = NpsCategory.ALL.value


@attrs.define
class _ConcurrencyDoc:
    per_token: int = 8
    total: int = 64


@attrs.define
class _RateDoc:
    max_requests: int = DEFAULT_MAX_REQUESTS
    window: float = DEFAULT_WINDOW
    reserve: int | None = None


_Start = NewType("_Start", object)
"""A date, datetime, ISO 8601 string or relative "-90d"."""
_End = NewType("_End", object)
"""A date, datetime, ISO 8601 string or "now"."""
_Span = NewType("_Span", timedelta)
"""A duration: "2d", "36h", "90m", "1w" or a number of seconds."""


@attrs.define
class _SpecDoc:
    tokens: list[_TokenDoc]
    date_from: _Start
    date_to: _End = _End(None)
    settle: _Span | None = None
    lookback: _Span | None = None
    output: _PathText = _PathText("lexer-output")
    reports: _ReportNames = _ReportNames(ALL_REPORTS)
    exports: _ExportsDoc = attrs.Factory(_ExportsDoc)
    nps: _NpsDoc = attrs.Factory(_NpsDoc)
    window_months: int = 1
    export_window_months: int | None = None
    export_connections: int | None = None
    concurrency: _ConcurrencyDoc = attrs.Factory(_ConcurrencyDoc)
    api_url: str | None = None
    status_url: str | None = None
    rate_limit: _RateDoc = attrs.Factory(_RateDoc)
    redis_url: str | None = None
    limit_store: _PathText | None = None
    checkpoint_url: str | None = None
    workflow_states_type: str = DEFAULT_WORKFLOW_STATES_TYPE
    poll: PollPolicy = attrs.Factory(PollPolicy)
    format: str = "json"
    proxy: str | None = None  # net-sync
    ca_bundle: _PathText | None = None  # net-sync


_TABLES = frozenset({"nps", "concurrency", "rate_limit", "poll"})
_MISSING = {
    "tokens[]": "needs a `label` and one of `env` or `file`",
    "exports[]": "needs a `kind`",
    "exports.kinds[]": "needs a `kind`",
}


def _structure_int(value: object, _: type) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise _Invalid(f"must be an integer, got {shown(value)}")


def _structure_float(value: object, _: type) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return value
    raise _Invalid(f"must be a finite number, got {shown(value)}")


def _structure_str(value: object, _: type) -> str:
    if isinstance(value, str):
        return value
    raise _Invalid(f"must be a string, got {shown(value)}")


def _structure_bool(value: object, _: type) -> bool:
    if isinstance(value, bool):
        return value
    raise _Invalid(f"must be true or false, got {shown(value)}")


def _structure_format(value: object, _: type) -> _Format:
    if value in EXPORT_FORMATS:
        return _Format(str(value))
    raise _Invalid(f'must be "csv" or "parquet", got {shown(value)}')


def _structure_path(value: object, _: type) -> _PathText:
    text = _structure_str(value, str)
    if not text or "\0" in text:
        raise _Invalid("must be a non-empty path without NUL characters")
    return _PathText(text)


def _structure_reports(value: object, _: type) -> _ReportNames:
    if value == "all":
        return _ReportNames(ALL_REPORTS)
    if isinstance(value, str):
        return _ReportNames((value,))
    if not isinstance(value, list):
        raise _Invalid(f'must be "all", a name or a list, got {shown(value)}')
    return _ReportNames(tuple(_converter.structure(value, list[str])))


def _structure_kind(value: object, _: type) -> ExportKind:
    name = _structure_str(value, str)
    try:
        return ExportKind(name)
    except ValueError:
        known = ", ".join(k.value for k in ExportKind)
        # Named by its entry: the entry may be the bare string itself.
        raise _Invalid(f"unknown kind {name!r} ({known})", sep="\0: ") from None


def _structure_when(value: object, _: type) -> datetime:
    """A TOML date, datetime or ISO 8601 string, with a UTC offset (a bare date: UTC)."""
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, date):
        moment = datetime(value.year, value.month, value.day, tzinfo=timezone.utc)
    elif isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise _Invalid(f"{value!r} is not an ISO 8601 date or datetime", ": ") from None
        if len(value) == 10:
            moment = moment.replace(tzinfo=timezone.utc)
    else:
        raise _Invalid(f"must be a date or datetime, got {shown(value)}")
    if moment.tzinfo is None:
        text = value if isinstance(value, str) else moment.isoformat()
        raise _Invalid(f"{text!r} has no UTC offset (a bare date means UTC midnight)", ": ")
    try:
        moment.utcoffset()
        moment.astimezone(timezone.utc)
    except (ValueError, OverflowError):
        raise _Invalid(f"{value!r} is out of range", ": ") from None
    return moment


_DURATION = re.compile(r"(\d{1,9})\s*([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> timedelta | None:
    """``"3d"``, ``"36h"``, ``"90m"``, ``"45s"`` or ``"2w"`` as a `timedelta`, else None."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        return None
    return timedelta(seconds=int(match[1]) * _UNITS[match[2]])


def _structure_span(value: object, _: type) -> _Span:
    if isinstance(value, str):
        span = parse_duration(value)
        if span is None:
            raise _Invalid(f'{value!r} is not a duration like "2d", "36h", "90m" or "1w"', ": ")
        return _Span(span)
    seconds = _structure_float(value, float)
    if not 0 <= seconds <= MAX_RELATIVE.total_seconds():
        raise _Invalid(f"must be a duration of 0 or more seconds, got {shown(value)}")
    return _Span(timedelta(seconds=seconds))


def _structure_start(value: object, _: type) -> _Start:
    if isinstance(value, str) and value.strip().startswith("-"):
        span = parse_duration(value.strip()[1:])
        if span is None or not span:
            raise _Invalid(f'{value!r} is not a relative date like "-90d" (units: s m h d w)', ": ")
        return _Start(-span)
    return _Start(_structure_when(value, datetime))


def _structure_end(value: object, _: type) -> _End:
    if value == "now":
        return _End(None)
    return _End(_structure_when(value, datetime))


def _strict_list(kind: Any, converter: BaseConverter) -> Callable[[object, Any], Any]:
    """Lists only: cattrs alone would take a string as a list of characters."""
    items = list_structure_factory(kind, converter)

    def structure(value: object, target: Any) -> Any:
        if not isinstance(value, list):
            raise _Invalid(f"must be a list, got {shown(value)}")
        return items(value, target)

    return structure


def _table_of(cls: Any, converter: BaseConverter) -> Callable[[object, Any], Any]:
    """Tables only, with `ExportDoc`'s shorthand: a bare string is its ``kind``."""
    fields = make_dict_structure_fn(cls, converter)

    def structure(value: object, target: Any) -> Any:
        if cls is _ExportDoc and isinstance(value, str):
            value = {"kind": value}
        if cls is _ExportsDoc and isinstance(value, list):
            value = {"kinds": value}  # the list form (`_spec_fields` words its paths)
        if not isinstance(value, Mapping):
            what = "a list or an [exports] table" if cls is _ExportsDoc else "a table"
            raise _Invalid(f"must be {what}, got {shown(value)}")
        return fields(value, target)

    return structure


def _is_list_type(kind: Any) -> bool:
    return getattr(kind, "__origin__", None) is list


def _make_converter() -> cattrs.Converter:
    converter = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
    for kind, hook in (
        (int, _structure_int),
        (bool, _structure_bool),
        (_Format, _structure_format),
        (float, _structure_float),
        (str, _structure_str),
        (_PathText, _structure_path),
        (_ReportNames, _structure_reports),
        (ExportKind, _structure_kind),
        (datetime, _structure_when),
        (_Start, _structure_start),
        (_End, _structure_end),
        (_Span, _structure_span),
    ):
        converter.register_structure_hook(kind, hook)
    converter.register_structure_hook_factory(_is_list_type, _strict_list)
    converter.register_structure_hook_factory(attrs.has, _table_of)
    return converter


_converter = _make_converter()


def _where(path: str) -> tuple[str, str]:
    """A cattrs path (``$.concurrency.total``, ``$.tokens[0].label``) as the user reads
    the file (``[concurrency] total``, ``tokens[0].label``), and as a dotted key path."""
    dotted = path.removeprefix("$").removeprefix(".")
    head, _, rest = dotted.partition(".")
    if not dotted:
        return "spec", ""
    if head in _TABLES:
        return (f"[{head}] {rest}" if rest else f"[{head}]"), dotted
    if head == "exports" and rest and not rest.startswith("kinds"):
        return f"[exports] {rest}", dotted
    if "[" in dotted or head in ("date_from", "date_to", "settle", "lookback"):
        return dotted, dotted
    return f"`{dotted}`", dotted


def _message(error: BaseException, _: type | None) -> str:
    """One failure as text for `cattrs.transform_error` (which appends `` @ path``)."""
    if isinstance(error, _Invalid):
        return f"{error.sep}{error.text}"
    if isinstance(error, ForbiddenExtraKeysError):
        return "\0extra " + ",".join(sorted(map(str, error.extra_fields)))
    if isinstance(error, KeyError):
        return "\0missing"
    return " is invalid"  # pragma: no cover - every hook raises _Invalid


def _sentence(line: str, known: dict[str, list[str]]) -> str:
    text, _, path = line.rpartition(" @ ")
    name, dotted = _where(path)
    if text == "\0missing":
        parent, _, key = dotted.rpartition(".")
        generic = re.sub(r"\[\d+\]", "[]", parent)
        if generic in _MISSING:
            return f"{parent} {_MISSING[generic]}"
        if key == "tokens" and not parent:
            return "spec needs `tokens`"
        return f"{_where('$.' + parent)[0] if parent else 'spec'} needs `{key}`"
    if text.startswith("\0extra "):
        extra = text.removeprefix("\0extra ").split(",")
        paths = ", ".join(f"`{dotted + '.' if dotted else ''}{key}`" for key in extra)
        allowed = ", ".join(known.get(re.sub(r"\[\d+\]", "[]", dotted), []))
        return f"unknown keys in {name}: {', '.join(extra)} ({paths}; known: {allowed})"
    if text.startswith("\0"):  # named by the entry holding the key
        name, text = _where(path.rpartition(".")[0])[0], text[1:]
    if dotted == "tokens" and text.startswith(" must be a list"):
        text = " must be a list of tables ([[tokens]] with label and env/file)"
    return f"{name}{text}"


def _known_keys() -> dict[str, list[str]]:
    """The keys each table allows, by dotted path (list items generic)."""
    tables: dict[str, Any] = {
        "": _SpecDoc,
        "nps": _NpsDoc,
        "concurrency": _ConcurrencyDoc,
        "rate_limit": _RateDoc,
        "poll": PollPolicy,
        "tokens[]": _TokenDoc,
        "exports[]": _ExportDoc,
        "exports": _ExportsDoc,
        "exports.kinds[]": _ExportDoc,
    }
    return {key: sorted(f.name for f in attrs.fields(cls)) for key, cls in tables.items()}


def _refuse_inline_tokens(data: Mapping[str, Any]) -> None:
    """A token pasted into the spec is refused before anything else, never echoed."""
    if "token" in data:
        raise SpecError(
            "`token` in the spec: put each token in an environment variable (`env`) or a "
            "file (`file`) of a [[tokens]] entry, never in the spec"
        )
    entries = data.get("tokens")
    for i, entry in enumerate(entries if isinstance(entries, list) else []):
        if isinstance(entry, Mapping) and "token" in entry:
            label = entry.get("label")
            shown_label = f" ({label!r})" if isinstance(label, str) else ""
            raise SpecError(
                f"tokens[{i}]{shown_label}: put the token in an environment variable "
                "(`env`) or a file (`file`), never in the spec"
            )


def _limit_store(value: str | None, base_dir: Path) -> Path | str | None:
    """``limit_store``: ``"memory"`` as is, else a path relative to the spec file."""
    if value is None or value == "memory":
        return value
    return base_dir / Path(value).expanduser()


def _export_window_months(doc: _SpecDoc) -> int | None:
    """``[exports] window_months``, or the top-level ``export_window_months`` (for specs
    whose exports are a ``[[exports]]`` list, which TOML cannot give keys of its own)."""
    if doc.exports.window_months is not None and doc.export_window_months is not None:
        raise SpecError("give [exports] window_months or export_window_months, not both")
    if doc.exports.window_months is not None:
        _check_months(doc.exports.window_months, "[exports] window_months")
        return doc.exports.window_months
    return doc.export_window_months


def _export_connections(doc: _SpecDoc) -> int:
    """``[exports] connections``, or the top-level ``export_connections`` (the
    ``[[exports]]`` list form); 1 when neither is given."""
    if doc.exports.connections is not None and doc.export_connections is not None:
        raise SpecError("give [exports] connections or export_connections, not both")
    if doc.exports.connections is not None:
        _check_connections(doc.exports.connections)
        return doc.exports.connections
    if doc.export_connections is not None:
        _check_connections(doc.export_connections, "export_connections")
        return doc.export_connections
    return 1


def _spec_fields(data: Mapping[str, Any], base_dir: Path) -> dict[str, Any]:
    """`BackfillSpec` fields from parsed TOML, or `SpecError` naming every bad key."""
    if not isinstance(data, Mapping):
        raise SpecError(f"a spec must be a table, got {shown(data)}")
    _refuse_inline_tokens(data)
    try:
        doc = _converter.structure(data, _SpecDoc)
    except (cattrs.BaseValidationError, _Invalid) as error:
        lines = cattrs.transform_error(error, format_exception=_message)
        known = _known_keys()
        reason = "; ".join(_sentence(line, known) for line in lines)
        if isinstance(data.get("exports"), list):  # named as written: exports[0], not kinds
            reason = reason.replace("exports.kinds[", "exports[")
        raise SpecError(reason) from None
    return {
        "tokens": tuple(
            TokenSource(t.label, t.env, base_dir / t.file if t.file is not None else None)
            for t in doc.tokens
        ),
        "date_from": doc.date_from,
        "date_to": doc.date_to,
        "settle": doc.settle,
        "lookback": doc.lookback or timedelta(0),
        "output": base_dir / doc.output,
        "reports": doc.reports,
        "exports": tuple(ExportSpec(e.kind, e.form, e.nps_category) for e in doc.exports.kinds),
        "export_format": doc.exports.format,
        "keep_csv": doc.exports.keep_csv,
        "nps_form": doc.nps.form,
        "nps_category": doc.nps.category,
        "window_months": doc.window_months,
        "export_window_months": _export_window_months(doc),
        "export_connections": _export_connections(doc),
        "per_token_concurrency": doc.concurrency.per_token,
        "total_concurrency": doc.concurrency.total,
        "api_url": doc.api_url,
        "status_url": doc.status_url,
        "max_requests": doc.rate_limit.max_requests,
        "window": doc.rate_limit.window,
        "reserve": doc.rate_limit.reserve,
        "redis_url": doc.redis_url,
        "limit_store": _limit_store(doc.limit_store, base_dir),
        "checkpoint_url": doc.checkpoint_url,
        "workflow_states_type": doc.workflow_states_type,
        "poll": doc.poll,
        "format": doc.format,
        "proxy": doc.proxy,  # net-sync
        "ca_bundle": base_dir / Path(doc.ca_bundle).expanduser() if doc.ca_bundle else None,
    }
