"""How sessions reach the hosts: the proxy, TLS verification and the environment.

One `Network` applies to the API, status and export-file sessions alike, so a corporate
proxy or private CA covers downloads as well. Options are checked when built, before any
request: a malformed proxy URL or an unreadable CA bundle is a `ConfigurationError`
naming the option.
"""

from __future__ import annotations

import ssl as ssl_module
import warnings
from os import PathLike, fspath
from urllib.parse import urlsplit

import attrs

from . import exceptions as exc

__all__ = ["Network", "network"]


@attrs.frozen
class Network:
    """Proxy and TLS settings shared by a client's sessions.

    ``proxy`` is an ``http://`` forward proxy (https targets go through a CONNECT
    tunnel, so the proxy never sees their headers); ``ssl`` is ``None`` (system trust),
    an `ssl.SSLContext`, or ``False`` (no verification, tests only); ``trust_env``
    honours ``HTTPS_PROXY``/``HTTP_PROXY``/``NO_PROXY`` (and ``SSL_CERT_FILE`` through
    OpenSSL's defaults) as curl does, unless an explicit ``proxy`` is given.
    """

    proxy: str | None = None
    ssl: ssl_module.SSLContext | bool | None = None
    trust_env: bool = True

    @property
    def connector_ssl(self) -> ssl_module.SSLContext | bool:
        """The value for aiohttp's ``ssl=``: ``True`` means default verification."""
        return True if self.ssl is None else self.ssl

    def __repr__(self) -> str:
        proxy = _redact_userinfo(self.proxy)
        return f"Network(proxy={proxy!r}, ssl={self.ssl!r}, trust_env={self.trust_env!r})"


def network(
    *,
    proxy: str | None = None,
    ssl: ssl_module.SSLContext | bool | None = None,
    ca_bundle: str | PathLike[str] | None = None,
    trust_env: bool = True,
) -> Network:
    """Check and combine the options (``ca_bundle``: a PEM file of CAs to trust instead
    of the system's)."""
    if proxy is not None:
        parts = urlsplit(proxy)
        try:
            port_ok = parts.port is None or parts.port > 0
        except ValueError:
            port_ok = False
        if (
            parts.scheme != "http"
            or not parts.hostname
            or not port_ok
            or parts.path not in ("", "/")
        ):
            raise exc.ConfigurationError(
                f"proxy must be an http:// URL such as http://proxy.example:3128, "
                f"got {_redact_userinfo(proxy)!r}"
            )
    if ssl is True:
        ssl = None
    if ca_bundle is not None:
        if ssl is not None:
            raise exc.ConfigurationError("pass either ssl or ca_bundle, not both")
        try:
            ssl = ssl_module.create_default_context(cafile=fspath(ca_bundle))
        except (OSError, ssl_module.SSLError, ValueError) as error:
            reason = getattr(error, "strerror", None) or type(error).__name__
            raise exc.ConfigurationError(
                f"ca_bundle {fspath(ca_bundle)!r} cannot be used as a PEM CA bundle: {reason}"
            ) from None
    if ssl is False:
        warnings.warn(
            "ssl=False: TLS certificates are not verified; use this only in tests",
            stacklevel=3,
        )
    elif ssl is not None and not isinstance(ssl, ssl_module.SSLContext):
        raise exc.ConfigurationError("ssl must be an ssl.SSLContext, False or None")
    return Network(proxy=proxy, ssl=ssl, trust_env=bool(trust_env))


def _redact_userinfo(url: str | None) -> str | None:
    """``url`` without any password it embeds (a proxy's credentials)."""
    if url is None:
        return None
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return url.replace(f":{parts.password}@", ":<redacted>@", 1)
