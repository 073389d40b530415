"""Which hosts and origins a server without a token answers (no dependencies: `app` and `api` both use it).

A server without a token trusts whoever can reach it; that is only safe on loopback, and only against programs on
this machine. A web page the operator visits is such a program's proxy: it can POST a form to 127.0.0.1 (its
`Origin` names the page's site) or rename its own site to 127.0.0.1 by DNS rebinding (its `Host` keeps the page's
name). So without a token the API answers only requests addressed to a loopback name, and refuses state-changing
requests that a page of another origin sends. A token is the stronger rule: its holders may use any Host and Origin.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

LOOPBACK_NAMES = ("localhost",)
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def is_loopback(host: str) -> bool:
    """A loopback address or `localhost` (a host name may resolve to anything, so only that one name counts)."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def split_host(value: str) -> tuple[str, int | None] | None:
    """`Host` header value → (name, port); None when it is malformed."""
    try:
        parts = urlsplit("//" + value)
        return parts.hostname or "", parts.port
    except ValueError:
        return None


def loopback_host(value: str) -> bool:
    parsed = split_host(value)
    return parsed is not None and bool(parsed[0]) and is_loopback(parsed[0])


def same_loopback_origin(origin: str, host: str) -> bool:
    """Whether `origin` is this server's own loopback origin, as the request's `Host` names it."""
    try:
        parts = urlsplit(origin)
        port = parts.port
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or not parts.hostname or not is_loopback(parts.hostname):
        return False
    served = split_host(host)
    if served is None:
        return False
    default = 443 if parts.scheme == "https" else 80
    return parts.hostname.lower() == served[0].lower() and (port or default) == (served[1] or default)
