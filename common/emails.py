"""Email addresses in free text (URLs, titles, table columns), found in linear time.

A regular expression tried from every position costs the square of a text's length when a long run
of letters ends in an ``@``: a one-megabyte URL would stall a worker for hours. So each ``@`` (or
its percent-encoding ``%40``) is found first, and only a bounded stretch on either side of it is
matched: the local part backwards (at most 64 characters, as RFC 5321 allows), the domain forwards.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from urllib.parse import unquote

# An @, or its percent-encoding once (a URL's query) or twice (a return URL inside a URL's query).
AT = re.compile(r"@|%40|%2540")
# The local part, matched on the reversed text before the @: letters, digits, . + - ', an encoded
# + or ' (%2B, %27, reversed "B2%", "72%") and the escapes of UTF-8 bytes (%80-%FF: "m%C3%BCller"),
# but no other percent-escape: "email%3Dalice" gives "alice", not "3Dalice". A + is kept (privacy
# first): a form-encoded space before an address ("order+alice") goes with it.
LOCAL_PART_REVERSED = re.compile(r"(?:[Bb]2%|72%|[0-9A-Fa-f][89A-Fa-f]%|(?![0-9A-Fa-f]{2}%)[\w.+'-]){1,64}")
# Labels of at most 63 characters, a top-level domain of letters that is no image or script
# extension (a retina asset "logo@2x.png" is no address), not followed by another letter.
DOMAIN = re.compile(r"[\w-]{1,63}(?:\.[\w-]{1,63}){0,8}\.(?!(?:png|jpe?g|gif|svg|webp|avif|css|js)\b)"
                    r"[A-Za-z]{2,24}(?![A-Za-z])")


def spans(text: str) -> Iterator[tuple[int, int]]:
    """(start, end) of every address in ``text``, in order, none overlapping."""
    last = 0
    for at in AT.finditer(text):
        if at.start() < last:
            continue
        domain = DOMAIN.match(text, at.end())
        if not domain:          # most @ in hostile text: skip the local part's slice and match
            continue
        local = LOCAL_PART_REVERSED.match(text[max(last, at.start() - 64):at.start()][::-1])
        if local:
            yield at.start() - local.end(), domain.end()
            last = domain.end()


def _has_at(text: str) -> bool:
    return "@" in text or "%40" in text or "%2540" in text        # a fast way out for most text


def contains(text: str) -> bool:
    return _has_at(text) and next(spans(text), None) is not None


def decoded(address: str) -> str:
    """The address percent-decoded as often as it was encoded (``alice%2540x.org`` is ``alice@x.org``)."""
    while "%" in address and (plain := unquote(address)) != address:
        address = plain
    return address


def replace(text: str, replacement: Callable[[str], str]) -> str:
    """``text`` with every address replaced by ``replacement(address)``, the address percent-decoded
    first (``alice%2Bshop%40example.com`` is ``alice+shop@example.com``)."""
    if not _has_at(text):
        return text
    parts, last = [], 0
    for start, end in spans(text):
        parts += [text[last:start], replacement(decoded(text[start:end]))]
        last = end
    return "".join(parts) + text[last:] if parts else text
