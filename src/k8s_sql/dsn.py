"""Database DSNs without their secrets, for log lines and error messages.

The invariant: no text k8s-sql writes (a log line, an error line, a message it
raises) contains the password of its ``--endpoint``. Two layers keep it:

- :func:`redact` replaces the password of a DSN wherever k8s-sql itself quotes
  one (the "ready" line, a DSN it cannot parse);
- :func:`scrub` cleans free text that may quote a DSN or the password without
  our knowing, such as a driver's exception: the log formatter
  (:class:`RedactingFormatter`) runs it over every formatted record, so even a
  message nobody thought of is covered.

Redaction errs on the side of hiding too much: a password holding characters a
URL reserves (``@``, ``/``, ``?``) unencoded is still hidden whole, at the price
of hiding some of the host in such odd DSNs.
"""

from __future__ import annotations

import logging
import re
from typing import Any
from urllib.parse import unquote

REDACTED = "***"

# Query parameters that carry a secret: libpq's (and asyncpg's) ``password`` and
# ``sslpassword``; any ``…password`` name is treated alike.
_SECRET_PARAM = re.compile(r"(?i)^[a-z_-]*password$")

# ``scheme://user:password@`` anywhere in free text (a driver's message quoting a DSN).
# Greedy up to the last ``@`` of the token, as redact() does.
_URL_USERINFO = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://[^\s:/?#@]*:)([^\s]*)(@)")

# Shorter secrets are only hidden where they appear in a URL: replacing every
# occurrence of a one- to three-character string would garble every log line.
MIN_SCRUB_LENGTH = 4


def _password_span(dsn: str) -> tuple[int, int] | None:
    """Where the password of the DSN's ``user:password@`` part is, if it has one."""
    scheme = dsn.find("://")
    if scheme < 0:
        return None
    start = scheme + 3
    # The authority ends at the first '/', '?' or '#'; the userinfo at its last '@'.
    end = next((i for i in range(start, len(dsn)) if dsn[i] in "/?#"), len(dsn))
    if end == start:  # no authority (sqlite:///PATH): no userinfo, whatever the path holds
        return None
    at = dsn.rfind("@", start, end)
    if at < 0:
        # A password with an unencoded '/', '?' or '#' ends the authority early:
        # fall back to the last '@' anywhere (hiding too much rather than too little).
        at = dsn.rfind("@", start)
        if at < 0:
            return None
    colon = dsn.find(":", start, at)
    if colon < 0:
        return None
    return colon + 1, at


def _secret_params(dsn: str, after: int) -> list[tuple[int, int]]:
    """The spans of the values of secret query parameters (``?password=…``)."""
    q = dsn.find("?", after)
    if q < 0:
        return []
    spans = []
    pos = q + 1
    for part in dsn[q + 1 :].split("&"):
        name, eq, _value = part.partition("=")
        if eq and _SECRET_PARAM.match(name):
            spans.append((pos + len(name) + 1, pos + len(part)))
        pos += len(part) + 1
    return spans


def _spans(dsn: str) -> list[tuple[int, int]]:
    spans = []
    pw = _password_span(dsn)
    if pw is not None:
        spans.append(pw)
    spans += _secret_params(dsn, pw[1] if pw is not None else 0)
    return sorted(s for s in spans if s[1] > s[0])


def redact(dsn: str) -> str:
    """The DSN with its password (and any ``password=`` query parameter) replaced by
    ``***``; the rest (user, hosts, database, options) is kept for the reader."""
    out, last = [], 0
    for a, b in _spans(dsn):
        if a < last:
            continue
        out += [dsn[last:a], REDACTED]
        last = b
    out.append(dsn[last:])
    return "".join(out)


def secrets(dsn: str) -> list[str]:
    """The secrets a DSN holds, as written and percent-decoded, longest first (so a
    longer secret is replaced before one it contains)."""
    found: set[str] = set()
    for a, b in _spans(dsn):
        raw = dsn[a:b]
        found.update(s for s in (raw, unquote(raw)) if s)
    return sorted(found, key=len, reverse=True)


def scrub(text: str, hidden: list[str] | tuple[str, ...] = ()) -> str:
    """``text`` with every URL's password and every string of ``hidden`` (at least
    :data:`MIN_SCRUB_LENGTH` long) replaced by ``***``."""
    text = _URL_USERINFO.sub(lambda m: m[1] + REDACTED + m[3], text)
    for secret in hidden:
        if len(secret) >= MIN_SCRUB_LENGTH:
            text = text.replace(secret, REDACTED)
    return text


class RedactingFormatter(logging.Formatter):
    """A formatter whose every line (message, arguments, exception and stack text
    alike) has passed through :func:`scrub`."""

    def __init__(self, fmt: str, hidden: list[str], tracebacks: bool = False) -> None:
        super().__init__(fmt)
        self.hidden = list(hidden)
        self.tracebacks = tracebacks  # full tracebacks (--log-level debug); else one line

    def format(self, record: logging.LogRecord) -> str:
        return scrub(super().format(record), self.hidden)

    def formatException(self, ei: Any) -> str:
        """Libraries log expected trouble with tracebacks (asyncpg's pool, for one,
        while the database is away): an operator gets one line per error unless
        debugging."""
        if self.tracebacks:
            return super().formatException(ei)
        e = ei[1]
        return f"  ({type(e).__name__}: {' '.join(str(e).split())[:500]})"

    def formatStack(self, stack_info: str) -> str:
        return super().formatStack(stack_info) if self.tracebacks else ""
