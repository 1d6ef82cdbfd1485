"""The backfill spec: what to fetch, for which tokens, into which folder.

A spec comes from TOML (`BackfillSpec.from_toml`) or Python. Every key is type-checked
and every name that becomes part of a file path (token labels, report types) is checked
for safety and uniqueness, so a bad spec raises `SpecError` naming the key before any
request is sent.
"""

from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Mapping
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs

from .. import exceptions as exc
from ..exports import PollPolicy
from ..limits import DEFAULT_MAX_REQUESTS, DEFAULT_WINDOW
from ..reports import (
    DEFAULT_WORKFLOW_STATES_TYPE,
    ExportKind,
    NpsCategory,
    ReportType,
    add_months,
    validate_nps,
)

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
    "MAX_NAME_LENGTH",
    "check_name",
]

ALL_REPORTS = tuple(k.value for k in ReportType)
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
    """What to backfill. Build it directly or with `BackfillSpec.from_toml`."""

    tokens: tuple[TokenSource, ...]
    date_from: datetime
    date_to: datetime
    output: Path
    reports: tuple[str, ...] = ALL_REPORTS
    exports: tuple[ExportSpec, ...] = ()
    nps_form: int | None = None
    nps_category: str = NpsCategory.ALL.value
    window_months: int = 1
    per_token_concurrency: int = 8
    total_concurrency: int = 64
    api_url: str | None = None
    status_url: str | None = None
    max_requests: int = DEFAULT_MAX_REQUESTS
    window: float = DEFAULT_WINDOW
    redis_url: str | None = None
    workflow_states_type: str = DEFAULT_WORKFLOW_STATES_TYPE
    poll: PollPolicy = attrs.field(factory=PollPolicy)

    def __attrs_post_init__(self) -> None:
        _check_spec(self)

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
        return _spec_from_dict(cls, data, base_dir, overrides)


# -- names that become paths ------------------------------------------------------------


def check_name(what: str, name: object) -> str:
    """``name`` if it is safe as one folder name on every common file system, else
    `SpecError` saying why: 1 to `MAX_NAME_LENGTH` printable characters, none of
    ``/ \\ : * ? " < > |``, not starting with a dot nor ending with a dot or a space."""
    if not isinstance(name, str):
        raise SpecError(f"{what} must be a string, got {_shown(name)}")
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


def _check_spec(spec: BackfillSpec) -> None:
    if not spec.tokens:
        raise SpecError("spec needs at least one token")
    folded: dict[str, str] = {}
    for source in spec.tokens:
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
    if not isinstance(spec.output, Path) or "\0" in str(spec.output):
        raise SpecError("output must be a path without NUL characters")
    if spec.date_from.tzinfo is None or spec.date_to.tzinfo is None:
        raise SpecError("date_from and date_to need a UTC offset")
    if spec.date_from >= spec.date_to:
        raise SpecError("date_from must be before date_to")
    if not _is_int(spec.window_months) or not 1 <= spec.window_months <= 12:
        raise SpecError("window_months must be 1 to 12")
    try:  # the planner's last window may end up to a window after date_to
        add_months(spec.date_to.astimezone(spec.date_from.tzinfo), spec.window_months)
    except (ValueError, OverflowError):
        raise SpecError("date_to is too late to plan windows after it") from None
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
    needs_form = any(r in ("nps_summary", "nps_volume") for r in spec.reports)
    if needs_form:
        try:
            validate_nps(spec.nps_form, spec.nps_category)
        except exc.ValidationError as error:
            raise SpecError(f"[nps] form/category for NPS reports: {error}") from None
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
    caps = (spec.per_token_concurrency, spec.total_concurrency)
    if not all(_is_int(c) for c in caps) or min(caps) < 1:
        raise SpecError("concurrency caps must be at least 1")
    if (
        not _is_int(spec.max_requests)
        or spec.max_requests < 1
        or not _is_number(spec.window)
        or not 0 < spec.window < math.inf
    ):
        raise SpecError("rate_limit needs max_requests >= 1 and window > 0")
    _check_poll("[poll]", spec.poll)
    for key in ("api_url", "status_url"):
        _check_url(key, getattr(spec, key), ("http", "https"))
    _check_url("redis_url", spec.redis_url, ("redis", "rediss", "unix"))


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
            raise SpecError(f"{where} {key} must be a finite number, got {_shown(value)}")
        if value < low or (strict and value == low):
            bound = f"> {low:g}" if strict else f">= {low:g}"
            raise SpecError(f"{where} {key} must be {bound}, got {value!r}")
    if poll.jitter_low > 1:
        raise SpecError(f"{where} jitter_low must be at most 1, got {poll.jitter_low!r}")


def _check_url(key: str, url: object, schemes: tuple[str, ...]) -> None:
    if url is None:
        return
    if not isinstance(url, str):
        raise SpecError(f"`{key}` must be a string, got {_shown(url)}")
    try:
        parts = urlsplit(url)
        host = parts.hostname if parts.scheme != "unix" else parts.path
    except ValueError:  # e.g. a bad IPv6 literal or port
        host = None
    if not url.isprintable() or " " in url or not host or parts.scheme not in schemes:
        raise SpecError(f"`{key}` must be a {'/'.join(schemes)} URL, got {url!r}")


# -- typed reading of parsed TOML -------------------------------------------------------

_KNOWN_KEYS = {
    "tokens",
    "date_from",
    "date_to",
    "output",
    "reports",
    "exports",
    "nps",
    "window_months",
    "concurrency",
    "api_url",
    "status_url",
    "rate_limit",
    "redis_url",
    "workflow_states_type",
    "poll",
}
_TABLE_KEYS = {
    "nps": {"form", "category"},
    "concurrency": {"per_token", "total"},
    "rate_limit": {"max_requests", "window"},
    "poll": {f.name for f in attrs.fields(PollPolicy)},
}
_TOKEN_KEYS = {"label", "env", "file"}
_EXPORT_KEYS = {"kind", "form", "nps_category"}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _shown(value: object) -> str:
    """A value for an error message: numbers as they are, anything else by its type only
    (a string in the wrong place might be a pasted secret)."""
    if isinstance(value, (bool, int, float)):
        return f"{type(value).__name__} {value!r}"
    names = {str: "a string", list: "a list", datetime: "a datetime", date: "a date"}
    if isinstance(value, Mapping):
        return "a table"
    return names.get(type(value), f"a {type(value).__name__}")


def _table(where: str, value: object, allowed: set[str]) -> Mapping[str, Any]:
    """``value`` as a table whose keys are all in ``allowed``, or `SpecError`."""
    if not isinstance(value, Mapping):
        raise SpecError(f"{where} must be a table, got {_shown(value)}")
    unknown = set(value) - allowed
    if unknown:
        raise SpecError(
            f"unknown keys in {where}: {', '.join(sorted(map(str, unknown)))} "
            f"(known: {', '.join(sorted(allowed))})"
        )
    return value


def _string(name: str, value: object, *, path: bool = False) -> str:
    if not isinstance(value, str):
        raise SpecError(f"{name} must be a string, got {_shown(value)}")
    if path and (not value or "\0" in value):
        raise SpecError(f"{name} must be a non-empty path without NUL characters")
    return value


def _integer(name: str, value: object) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise SpecError(f"{name} must be an integer, got {_shown(value)}")


def _number(name: str, value: object) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return value
    raise SpecError(f"{name} must be a finite number, got {_shown(value)}")


def _optional(table: Mapping[str, Any], key: str, read: Any, name: str, default: Any) -> Any:
    return read(name, table[key]) if key in table else default


def _parse_when(name: str, value: object) -> datetime:
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, date):
        moment = datetime(value.year, value.month, value.day, tzinfo=timezone.utc)
    elif isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise SpecError(f"{name}: {value!r} is not an ISO 8601 date or datetime") from None
        if len(value) == 10:
            moment = moment.replace(tzinfo=timezone.utc)
    else:
        raise SpecError(f"{name} must be a date or datetime, got {_shown(value)}")
    if moment.tzinfo is None:
        shown = value if isinstance(value, str) else moment.isoformat()
        raise SpecError(f"{name}: {shown!r} has no UTC offset (a bare date means UTC midnight)")
    try:
        moment.utcoffset()
        moment.astimezone(timezone.utc)
    except (ValueError, OverflowError):
        raise SpecError(f"{name}: {value!r} is out of range") from None
    return moment


def _tokens(data: object, base_dir: Path) -> tuple[TokenSource, ...]:
    if not isinstance(data, list):
        raise SpecError("`tokens` must be a list of tables ([[tokens]] with label and env/file)")
    tokens = []
    for i, entry in enumerate(data):
        if not isinstance(entry, Mapping) or "label" not in entry:
            raise SpecError(f"tokens[{i}] needs a `label` and one of `env` or `file`")
        label = check_name(f"tokens[{i}].label", entry["label"])
        if "token" in entry:
            raise SpecError(
                f"tokens[{i}] ({label!r}): put the token in an environment variable "
                "(`env`) or a file (`file`), never in the spec"
            )
        _table(f"tokens[{i}]", entry, _TOKEN_KEYS)
        env = _optional(entry, "env", _string, f"tokens[{i}].env", None)
        file = _optional(entry, "file", _path_string, f"tokens[{i}].file", None)
        tokens.append(
            TokenSource(label=label, env=env, file=(base_dir / file) if file is not None else None)
        )
    return tuple(tokens)


def _path_string(name: str, value: object) -> str:
    return _string(name, value, path=True)


def _reports(value: object) -> tuple[str, ...]:
    if value == "all":
        return ALL_REPORTS
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list):
        raise SpecError(f'`reports` must be "all", a name or a list, got {_shown(value)}')
    return tuple(_string(f"reports[{i}]", name) for i, name in enumerate(value))


def _exports(value: object) -> tuple[ExportSpec, ...]:
    if not isinstance(value, list):
        raise SpecError(f"`exports` must be a list, got {_shown(value)}")
    specs = []
    for i, entry in enumerate(value):
        if isinstance(entry, str):
            entry = {"kind": entry}
        entry = _table(f"exports[{i}]", entry, _EXPORT_KEYS)
        if "kind" not in entry:
            raise SpecError(f"exports[{i}] needs a `kind`")
        kind_name = _string(f"exports[{i}].kind", entry["kind"])
        try:
            kind = ExportKind(kind_name)
        except ValueError:
            known = ", ".join(k.value for k in ExportKind)
            raise SpecError(f"exports[{i}]: unknown kind {kind_name!r} ({known})") from None
        specs.append(
            ExportSpec(
                kind,
                _optional(entry, "form", _integer, f"exports[{i}].form", None),
                _optional(entry, "nps_category", _string, f"exports[{i}].nps_category", None),
            )
        )
    return tuple(specs)


def _poll(value: object) -> PollPolicy:
    table = _table("[poll]", value, _TABLE_KEYS["poll"])
    fields = {key: _number(f"[poll] {key}", item) for key, item in table.items()}
    poll = PollPolicy(**fields)
    _check_poll("[poll]", poll)
    return poll


def _spec_from_dict(
    cls: type[BackfillSpec], data: Mapping[str, Any], base_dir: Path, overrides: dict[str, Any]
) -> BackfillSpec:
    if not isinstance(data, Mapping):
        raise SpecError(f"a spec must be a table, got {_shown(data)}")
    if "token" in data:
        raise SpecError(
            "`token` in the spec: put each token in an environment variable (`env`) or a "
            "file (`file`) of a [[tokens]] entry, never in the spec"
        )
    unknown = set(data) - _KNOWN_KEYS
    if unknown:
        raise SpecError(f"unknown keys in spec: {', '.join(sorted(map(str, unknown)))}")
    for key in ("tokens", "date_from", "date_to"):
        if key not in data:
            raise SpecError(f"spec needs `{key}`")
    nps = _table("[nps]", data.get("nps", {}), _TABLE_KEYS["nps"])
    concurrency = _table("[concurrency]", data.get("concurrency", {}), _TABLE_KEYS["concurrency"])
    rate = _table("[rate_limit]", data.get("rate_limit", {}), _TABLE_KEYS["rate_limit"])
    fields: dict[str, Any] = {
        "tokens": _tokens(data["tokens"], base_dir),
        "date_from": _parse_when("date_from", data["date_from"]),
        "date_to": _parse_when("date_to", data["date_to"]),
        "output": base_dir / _optional(data, "output", _path_string, "`output`", "lexer-output"),
        "reports": _reports(data.get("reports", "all")),
        "exports": _exports(data.get("exports", [])),
        "nps_form": _optional(nps, "form", _integer, "[nps] form", None),
        "nps_category": _optional(
            nps, "category", _string, "[nps] category", NpsCategory.ALL.value
        ),
        "window_months": _optional(data, "window_months", _integer, "`window_months`", 1),
        "per_token_concurrency": _optional(
            concurrency, "per_token", _integer, "[concurrency] per_token", 8
        ),
        "total_concurrency": _optional(concurrency, "total", _integer, "[concurrency] total", 64),
        "api_url": _optional(data, "api_url", _string, "`api_url`", None),
        "status_url": _optional(data, "status_url", _string, "`status_url`", None),
        "max_requests": _optional(
            rate, "max_requests", _integer, "[rate_limit] max_requests", DEFAULT_MAX_REQUESTS
        ),
        "window": _optional(rate, "window", _number, "[rate_limit] window", DEFAULT_WINDOW),
        "redis_url": _optional(data, "redis_url", _string, "`redis_url`", None),
        "workflow_states_type": _optional(
            data,
            "workflow_states_type",
            _string,
            "`workflow_states_type`",
            DEFAULT_WORKFLOW_STATES_TYPE,
        ),
    }
    if "poll" in data:
        fields["poll"] = _poll(data["poll"])
    fields.update(overrides)
    try:
        return cls(**fields)
    except TypeError as error:
        raise SpecError(f"invalid spec: {error}") from None
