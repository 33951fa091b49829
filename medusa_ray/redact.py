"""Credentials out of URLs before they are logged, tracked, recorded in error rows or published.

``strip_credentials(url)`` keeps a URL's scheme, host, port and path and drops its user, password, query and
fragment (signed URLs carry their signature in the query). It parses with ``urllib.parse.urlsplit``, but does
not trust it alone: a password holding an unescaped ``/``, ``?`` or ``#`` (``https://u:pa/ss@host``) moves the
``@`` out of what ``urlsplit`` calls the netloc, so that the user and part of the password would pass as the
host and path. Any ``@`` after ``://`` that is not inside the parsed netloc makes the URL ambiguous, and then
nothing but its scheme is kept. ``strip_credentials_in_text`` does the same to every URL inside free text (an
exception message, an error row).

Ground level: imports nothing from medusa_ray, so config, logging, export and distill can all use it.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

REDACTED = "[redacted]"

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# A URL inside text runs to the next whitespace or quote (as repr() and f-strings print them).
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>`]*")


def is_url(text: str) -> bool:
    return bool(_SCHEME.match(text))


def split_url(url: str) -> tuple[str, str | None, str]:
    """``(scheme, netloc, path)`` of ``url`` with the credentials gone; ``netloc`` is None when the URL is
    ambiguous or malformed, so that no part of it after the scheme can be trusted."""
    m = _SCHEME.match(url)
    if not m:
        raise ValueError(f"not a URL: {url!r}")
    scheme = m.group(1).lower()
    rest = url[m.end():]
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unclosed IPv6 bracket
        return scheme, None, ""
    if rest.count("@") != parts.netloc.count("@"):
        return scheme, None, ""  # an '@' in the path, query or fragment: a password with '/', '?' or '#' in it?
    netloc = parts.netloc.rpartition("@")[2]
    return scheme, netloc, parts.path


def strip_credentials(url: str | None) -> str | None:
    """``url`` without user, password, query or fragment; anything that is not a URL comes back unchanged."""
    if not url or not is_url(url):
        return url
    scheme, netloc, path = split_url(url)
    if netloc is None:
        return f"{scheme}://{REDACTED}"
    return urlunsplit((scheme, netloc, path, "", ""))


def strip_credentials_in_text(text: str | None) -> str | None:
    """``text`` with every URL in it passed through ``strip_credentials``."""
    if not text or "://" not in text:
        return text
    return _URL_IN_TEXT.sub(lambda m: strip_credentials(m.group(0)), text)
