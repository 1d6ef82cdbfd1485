"""How sessions reach the hosts: the proxy, TLS verification and the environment.

One `Network` applies to the API, status and export-file sessions alike, so a corporate
proxy or private CA covers downloads as well. Options are checked when built, before any
request: a malformed proxy URL (given, or in ``$HTTPS_PROXY``/``$HTTP_PROXY``) or an
unreadable CA bundle (given, or in ``$SSL_CERT_FILE``) is a `ConfigurationError` naming
the option.
"""

from __future__ import annotations

import functools
import os
import ssl as ssl_module
import warnings
from os import PathLike, fspath
from urllib.parse import urlsplit

import attrs

from . import exceptions as exc

__all__ = ["Network", "network", "redact_url"]

_PROXY_VARIABLES = ("https_proxy", "http_proxy")
"""The proxy variables aiohttp reads with ``trust_env`` (either case, lower case first)."""


@attrs.frozen
class Network:
    """Proxy and TLS settings shared by a client's sessions (build it with `network`).

    ``proxy`` is an ``http://`` forward proxy (https targets go through a CONNECT
    tunnel, so the proxy never sees their headers); ``ssl`` is ``None`` (system trust),
    an `ssl.SSLContext`, or ``False`` (no verification, tests only); ``trust_env``
    honours ``HTTPS_PROXY``/``HTTP_PROXY``/``NO_PROXY`` (unless an explicit ``proxy`` is
    given) and ``SSL_CERT_FILE``/``SSL_CERT_DIR``, as curl does.
    """

    proxy: str | None = None
    ssl: ssl_module.SSLContext | bool | None = None
    trust_env: bool = True

    @property
    def connector_ssl(self) -> ssl_module.SSLContext | bool:
        """The value for aiohttp's ``ssl=``: ``True`` means default verification."""
        return True if self.ssl is None else self.ssl

    def __repr__(self) -> str:
        proxy = redact_url(self.proxy)
        return f"Network(proxy={proxy!r}, ssl={self.ssl!r}, trust_env={self.trust_env!r})"


def network(
    *,
    proxy: str | None = None,
    ssl: ssl_module.SSLContext | bool | None = None,
    ca_bundle: str | PathLike[str] | None = None,
    trust_env: bool = True,
) -> Network:
    """Check and combine the options (``ca_bundle``: a PEM file of CAs to trust instead
    of the system's). Reads the environment now when ``trust_env``."""
    if proxy is not None:
        _check_proxy("proxy", proxy, ("http",))
    elif trust_env:
        for name, value in os.environ.items():
            if name.lower() in _PROXY_VARIABLES and value:
                _check_proxy(f"${name}", value, ("http",))  # aiohttp ignores https:// ones
    if ssl is True:
        ssl = None
    if ca_bundle is not None:
        if ssl is not None:
            raise exc.ConfigurationError("pass either ssl or ca_bundle, not both")
        ssl = _bundle_context("ca_bundle", fspath(ca_bundle))
    if ssl is False:
        warnings.warn(
            "ssl=False: TLS certificates are not verified; use this only in tests",
            stacklevel=3,
        )
    elif ssl is None:
        ssl = _environment_context(trust_env)
    elif not isinstance(ssl, ssl_module.SSLContext):
        raise exc.ConfigurationError("ssl must be an ssl.SSLContext, False or None")
    return Network(proxy=proxy, ssl=ssl, trust_env=bool(trust_env))


def redact_url(url: str | None) -> str | None:
    """``url`` without the credentials it may embed (``user:password@``)."""
    if url is None:
        return None
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    authority, slash, tail = rest.partition("/")
    if "@" not in authority:
        return url
    host = authority.rpartition("@")[2]
    return f"{scheme}{sep}<redacted>@{host}{slash}{tail}"


def _check_proxy(option: str, url: str, schemes: tuple[str, ...]) -> None:
    try:
        parts = urlsplit(url)
        ok = (
            parts.scheme in schemes
            and bool(parts.hostname)
            and (parts.port is None or parts.port > 0)
            and parts.path in ("", "/")
        )
    except ValueError:  # an unclosed "[", a port out of range: not a URL at all
        ok = False
    if not ok:
        raise exc.ConfigurationError(
            f"{option} must be an {'/'.join(s + '://' for s in schemes)} URL such as "
            f"http://proxy.example:3128, got {redact_url(url)!r}"
        )


def _bundle_context(
    option: str, cafile: str | None, capath: str | None = None
) -> ssl_module.SSLContext:
    try:
        return ssl_module.create_default_context(cafile=cafile, capath=capath)
    except (OSError, ssl_module.SSLError, ValueError) as error:
        reason = getattr(error, "strerror", None) or type(error).__name__
        raise exc.ConfigurationError(
            f"{option} {cafile or capath!r} cannot be used as a PEM CA bundle: {reason}"
        ) from None


def _environment_context(trust_env: bool) -> ssl_module.SSLContext | None:
    """The context for the system's trust as the environment asks, or None for aiohttp's
    default. aiohttp makes its default context once, at import, so an ``SSL_CERT_FILE``
    set later would be missed, and one set earlier honoured even without ``trust_env``."""
    cafile = os.environ.get("SSL_CERT_FILE") or None
    capath = os.environ.get("SSL_CERT_DIR") or None
    if cafile is None and capath is None:
        return None
    if trust_env:
        return _cached_context("$SSL_CERT_FILE" if cafile else "$SSL_CERT_DIR", cafile, capath)
    paths = ssl_module.get_default_verify_paths()
    builtin_file = paths.openssl_cafile if os.path.isfile(paths.openssl_cafile) else None
    builtin_dir = paths.openssl_capath if os.path.isdir(paths.openssl_capath) else None
    if builtin_file is None and builtin_dir is None:
        return None  # no built-in paths (e.g. Windows' certificate store): aiohttp's default
    return _cached_context("the system CA bundle", builtin_file, builtin_dir)


@functools.lru_cache(maxsize=8)
def _cached_context(option: str, cafile: str | None, capath: str | None) -> ssl_module.SSLContext:
    """One context per set of CA locations: loading a bundle takes milliseconds, and a
    backfill makes clients by the hundred."""
    return _bundle_context(option, cafile, capath)
