"""The exception hierarchy: everything this library raises derives from `LexerError`.

No exception ever holds the API token: errors carry the HTTP status, the server's
message, the report type and (for unexpected responses) a short excerpt of the body.
"""

from __future__ import annotations

__all__ = [
    "LexerError",
    "ConfigurationError",
    "ClientClosedError",
    "ValidationError",
    "APIError",
    "BadRequestError",
    "DateRangeTooLongError",
    "FutureStartDateError",
    "InvalidReportTypeError",
    "UnauthorizedError",
    "TokenMismatchError",
    "MissingTokenError",
    "NotFoundError",
    "RateLimitedError",
    "ServerError",
    "RequestTimeoutError",
    "TransportError",
    "LexerConnectionError",
    "MalformedResponseError",
    "ProxyError",
    "TLSError",
    "LexerTimeoutError",
    "UnexpectedResponseError",
    "ExportError",
    "ExportFailedError",
    "ExportTimeoutError",
    "DownloadError",
    "DownloadTimeoutError",
    "ExportSchemaError",
    "LimiterBackendError",
    "LimitStoreError",
    "OutputError",
    "PortUnavailableError",
]

BODY_EXCERPT_BYTES = 200


class LexerError(Exception):
    """Base class of every error raised by lexer-activity-async."""


class ConfigurationError(LexerError):
    """The client was configured wrongly (for example no API token anywhere)."""


class ClientClosedError(LexerError, RuntimeError):
    """A closed `LexerClient` was used again."""


class ValidationError(LexerError, ValueError):
    """Bad input detected before any request was sent (no rate budget was spent)."""


class APIError(LexerError):
    """The API answered with a documented error status.

    Attributes:
        status: the HTTP status code.
        message: the server's message (the body's text or its ``error``/``message`` field).
        report_type: the report type of the request, when it was a report.
    """

    def __init__(self, message: str, *, status: int, report_type: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.report_type = report_type

    def __str__(self) -> str:
        where = f" (report type {self.report_type!r})" if self.report_type else ""
        return f"HTTP {self.status}: {self.message}{where}"

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_api_error, (type(self), self.message, self.status, self.report_type))


def _rebuild_api_error(
    cls: type[APIError], message: str, status: int, report_type: str | None
) -> APIError:
    return cls(message, status=status, report_type=report_type)


class BadRequestError(APIError):
    """HTTP 400 with a message this library does not recognise."""


class DateRangeTooLongError(BadRequestError):
    """400 "Invalid report - date range is too long": the range exceeds 12 months."""


class FutureStartDateError(BadRequestError):
    """400 "Invalid report - starting date is a future date"."""


class InvalidReportTypeError(BadRequestError):
    """400 "Invalid report - invalid type"."""


class UnauthorizedError(APIError):
    """HTTP 401."""


class TokenMismatchError(UnauthorizedError):
    """401 "Unauthorized - api token not matching": the token is not valid."""


class MissingTokenError(UnauthorizedError):
    """401 "Unauthorized": no authentication data reached the server."""


class NotFoundError(APIError):
    """404 "Not found": the API's general error for a malformed request.

    Attributes:
        origin: which host answered, ``"api"`` or ``"status"`` (None if unknown).
        url: that host's base URL as configured (never holds the API token).
    """

    origin: str | None = None
    url: str | None = None


class RateLimitedError(APIError):
    """429 "Rate limited exceeded". ``retry_after`` is in seconds, when the server sent it."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 429,
        report_type: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, status=status, report_type=report_type)
        self.retry_after = retry_after

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_rate_limited, (self.message, self.report_type, self.retry_after))


def _rebuild_rate_limited(
    message: str, report_type: str | None, retry_after: float | None
) -> RateLimitedError:
    return RateLimitedError(message, report_type=report_type, retry_after=retry_after)


class ServerError(APIError):
    """HTTP 5xx."""


class RequestTimeoutError(APIError):
    """HTTP 408 from the server."""


class TransportError(LexerError):
    """The request did not get an HTTP answer."""

    def __init__(self, message: str, *, report_type: str | None = None) -> None:
        super().__init__(message)
        self.report_type = report_type


class LexerConnectionError(TransportError):
    """The connection failed or was dropped. ``request_sent`` is False when the connection
    could not even be made, so the server certainly never saw the request."""

    def __init__(
        self, message: str, *, report_type: str | None = None, request_sent: bool = True
    ) -> None:
        super().__init__(message, report_type=report_type)
        self.request_sent = request_sent


class MalformedResponseError(LexerConnectionError):
    """The server's answer was not valid HTTP: a bad status line, an invalid or over-long
    header, a non-numeric ``Content-Length``, broken chunked framing. Retried like a
    dropped connection (for idempotent requests)."""


class ProxyError(LexerConnectionError):
    """The forward proxy, not the host, failed the request: it could not be reached, or it
    answered an error status (``status``) to a CONNECT or in place of the host. A 407
    (proxy authentication required) is not retried; the others are, like a connection
    that could not be made."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        report_type: str | None = None,
        request_sent: bool = False,
    ) -> None:
        super().__init__(message, report_type=report_type, request_sent=request_sent)
        self.status = status


class TLSError(LexerConnectionError):
    """The TLS handshake failed: most often the host's certificate is not trusted (pass
    ``ca_bundle=`` or ``ssl=`` for a private CA). Never retried."""

    def __init__(self, message: str, *, report_type: str | None = None) -> None:
        super().__init__(message, report_type=report_type, request_sent=False)


class LexerTimeoutError(TransportError):
    """The request, or the call's overall deadline, timed out."""


class UnexpectedResponseError(LexerError):
    """A response that does not have the documented shape (or an undocumented status).

    Carries the status, the report type and the first 200 bytes of the body, never a
    half-filled result object.
    """

    def __init__(
        self,
        reason: str,
        *,
        status: int,
        report_type: str | None = None,
        body: bytes = b"",
    ) -> None:
        self.reason = reason
        self.status = status
        self.report_type = report_type
        self.body_excerpt = body[:BODY_EXCERPT_BYTES]
        super().__init__(reason)

    def __str__(self) -> str:
        where = f" for report type {self.report_type!r}" if self.report_type else ""
        return (
            f"unexpected response (HTTP {self.status}){where}: {self.reason}; "
            f"body starts {self.body_excerpt!r}"
        )

    def __reduce__(self) -> tuple[object, ...]:
        return (
            _rebuild_unexpected,
            (self.reason, self.status, self.report_type, self.body_excerpt),
        )


def _rebuild_unexpected(
    reason: str, status: int, report_type: str | None, body: bytes
) -> UnexpectedResponseError:
    return UnexpectedResponseError(reason, status=status, report_type=report_type, body=body)


class ExportError(LexerError):
    """Base class of export-pipeline errors."""


class ExportFailedError(ExportError):
    """The export job reached a terminal failure status."""

    def __init__(self, message: str, *, status: str, kind: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_export_failed, (str(self), self.status, self.kind))


def _rebuild_export_failed(message: str, status: str, kind: str | None) -> ExportFailedError:
    return ExportFailedError(message, status=status, kind=kind)


class ExportTimeoutError(ExportError, LexerTimeoutError):
    """The export job did not complete before the overall timeout."""


class DownloadError(ExportError):
    """The export file could not be downloaded completely and verified."""


class DownloadTimeoutError(DownloadError, LexerTimeoutError):
    """The file host did not connect, answer or finish within `DownloadPolicy`'s
    deadlines (``connect_timeout``, ``read_timeout``, ``timeout``)."""


class ExportSchemaError(ExportError):
    """An export's CSV does not fit its table schema (`tables.EXPORT_SCHEMAS`): a header
    that differs, a row that cannot be parsed, or a value that is not of its column's
    type or is missing where the column cannot be null.

    Attributes:
        kind: the export kind.
        row: the data row (1 = the first after the header), when one is at fault.
        column: the column's name, when one is at fault.
    """

    def __init__(
        self, message: str, *, kind: str, row: int | None = None, column: str | None = None
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.row = row
        self.column = column

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_schema_error, (str(self), self.kind, self.row, self.column))


def _rebuild_schema_error(
    message: str, kind: str, row: int | None, column: str | None
) -> ExportSchemaError:
    return ExportSchemaError(message, kind=kind, row=row, column=column)


class LimiterBackendError(LexerError):
    """The shared limiter backend (for example Redis) could not be reached or used."""


class LimitStoreError(LimiterBackendError):
    """The local limit store (an SQLite file) cannot be created, read or used: an
    unwritable path, a corrupt file, another program's file or a newer store version.

    Attributes:
        path: the store file.
        reason: what is wrong with it.
    """

    def __init__(self, path: object, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"rate-limit store {self.path} {reason}")

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.path, self.reason))


class OutputError(LexerError):
    """A local file or folder could not be written or read (permissions, full disk, bad name).

    Attributes:
        path: the path that failed.
        reason: the operating system's reason, e.g. ``"Permission denied"``.
    """

    def __init__(self, path: object, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.path, self.reason))


class PortUnavailableError(LexerError):
    """A local port could not be listened on (in use, not permitted, out of range).

    Attributes:
        host: the address that was to be bound.
        port: the port that failed.
        reason: the operating system's reason, e.g. ``"Address already in use"``.
    """

    def __init__(self, host: str, port: int, reason: str) -> None:
        self.host = host
        self.port = port
        self.reason = reason
        super().__init__(f"cannot listen on {host}:{port}: {reason}")

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.host, self.port, self.reason))
