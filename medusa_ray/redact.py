"""Credentials out of URLs before they are logged, tracked, recorded in error rows or published.

``strip_credentials(url)`` keeps a URL's scheme, host, port and path and drops its user, password, query and
fragment (signed URLs carry their signature in the query). It parses with ``urllib.parse.urlsplit``, but does
not trust it alone: a password holding an unescaped ``/``, ``?`` or ``#`` (``https://u:pa/ss@host``) moves the
``@`` out of what ``urlsplit`` calls the netloc, so that the user and part of the password would pass as the
host and path. Any ``@`` after ``://`` that is not inside the parsed netloc makes the URL ambiguous, and then
nothing but its scheme is kept. ``strip_credentials_in_text`` does the same to every URL inside free text (an
exception message, an error row).

``public_location(location)`` goes further, for what is published (an export's card and marker) or sent to a
tracker: an http(s) URL becomes its scheme and public host only; any other URL (``s3://``, ``gs://``,
``hdfs://``, ``file://``: the first component is a bucket or an internal host), one whose host is an IP
address or an internal name, and an ambiguous one become the scheme and a stable id (``source_id``, a hash
of the location without its credentials). A local path keeps its last two components, less any that name a
user (the directory under ``/home`` or ``/Users``, ``~user``, the login name) or hold an IP address; a Hub id
(``org/name``) is kept.

Ground level: imports nothing from medusa_ray, so config, logging, export and distill can all use it.
"""

from __future__ import annotations

import getpass
import hashlib
import ipaddress
import os
import re
from pathlib import PurePosixPath
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


# Schemes whose host is a public web server worth naming; every other scheme's "host" is a bucket, a
# container or a cluster-internal server.
_WEB_SCHEMES = {"http", "https"}
_INTERNAL_SUFFIXES = (".internal", ".local", ".localdomain", ".lan", ".corp", ".home", ".intranet", ".svc",
                      ".cluster.local", ".consul")
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")
_IPV4 = re.compile(r"(?<![0-9])[0-9]{1,3}(\.[0-9]{1,3}){3}(?![0-9])")
# Shared service accounts name nobody; a path component equal to one of these is kept.
_GENERIC_USERS = {"root", "ray", "ubuntu", "user", "users", "admin", "ec2-user", "nobody", "jovyan", "home"}


def public_location(location: str | None) -> str | None:
    """A location safe to publish: an http(s) URL as scheme and public host; any other URL, or one with an
    IP or internal host, as scheme and stable id; a local path as its last two components without user names
    or IPs; a Hub id (``org/name``) unchanged."""
    if not location:
        return location
    text = str(location).strip()
    if is_url(text):
        scheme, netloc, _ = split_url(text)
        host = _public_host(netloc) if scheme in _WEB_SCHEMES and netloc is not None else None
        return f"{scheme}://{host}" if host else f"{scheme}:{_redacted(text)}"
    if _HUB_ID.fullmatch(text) and not text.startswith("."):
        return text
    if "@" in text or ":" in text or "\\" in text:  # user@host:/path, C:\\Users\\..., anything else odd
        return _redacted(text)
    parts = [p for p in PurePosixPath(text).parts if p not in ("/", ".", "..")]
    private = _private_components(parts)
    kept = [p for i, p in enumerate(parts) if i >= len(parts) - 2 and i not in private]
    return str(PurePosixPath(*kept)) if kept else _redacted(text)


def _redacted(location: str) -> str:
    return f"redacted-{source_id(location)}"


def _public_host(netloc: str) -> str | None:
    """The host of ``netloc`` when it is a public DNS name; None for IPs, internal names and junk."""
    host = netloc.rpartition(":")[0] if netloc.rpartition(":")[2].isdigit() else netloc
    host = host.lower().rstrip(".")
    if host.startswith("["):
        return None  # an IPv6 literal
    try:
        ipaddress.ip_address(host)
        return None
    except ValueError:
        pass
    if (not re.fullmatch(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)+", host)
            or host.endswith(_INTERNAL_SUFFIXES) or host.rsplit(".", 1)[-1].isdigit()):
        return None
    return host


def _user_names() -> set[str]:
    names = {os.environ.get(k, "") for k in ("USER", "LOGNAME", "USERNAME", "SUDO_USER")}
    try:
        names.add(getpass.getuser())
    except Exception:  # noqa: BLE001 - no passwd entry in some containers
        pass
    return {n.lower() for n in names if n} - _GENERIC_USERS


def _private_components(parts: list[str]) -> set[int]:
    """Indexes of the path components that name a user or hold an IP address."""
    users = _user_names()
    private = set()
    for i, part in enumerate(parts):
        lower = part.lower()
        tokens = set(re.split(r"[-_.+ ]+", lower))
        if (part.startswith("~") or _IPV4.search(part) or (i and parts[i - 1].lower() in ("home", "users"))
                or tokens & users or lower in users):
            private.add(i)
    return private


def source_id(location: str) -> str:
    """A stable fingerprint of a full location, to recognise the same checkpoint without publishing its path.
    Taken over the location without its credentials, so that a password never goes into a published hash."""
    return hashlib.sha256(strip_credentials(location).encode()).hexdigest()[:16]
