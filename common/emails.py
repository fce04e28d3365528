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

AT = re.compile(r"@|%40")
# The local part, matched on the reversed text before the @: letters, digits, . + - and an encoded
# + (%2B, reversed "B2%"), but no other percent-escape: "email%3Dalice" gives "alice", not "3Dalice".
# A + is kept (privacy first): a form-encoded space before an address ("order+alice") goes with it.
LOCAL_PART_REVERSED = re.compile(r"(?:[Bb]2%|(?![0-9A-Fa-f]{2}%)[\w.+-]){1,64}")
# Labels of at most 63 characters, a top-level domain of letters that is no image or script
# extension (a retina asset "logo@2x.png" is no address).
DOMAIN = re.compile(r"[\w-]{1,63}(?:\.[\w-]{1,63}){0,8}\.(?!(?:png|jpe?g|gif|svg|webp|avif|css|js)\b)[A-Za-z]{2,24}\b")


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


def contains(text: str) -> bool:
    return ("@" in text or "%40" in text) and next(spans(text), None) is not None


def replace(text: str, replacement: Callable[[str], str]) -> str:
    """``text`` with every address replaced by ``replacement(address)``, the address percent-decoded
    first (``alice%2Bshop%40example.com`` is ``alice+shop@example.com``)."""
    if "@" not in text and "%40" not in text:
        return text
    parts, last = [], 0
    for start, end in spans(text):
        parts += [text[last:start], replacement(unquote(text[start:end]))]
        last = end
    return "".join(parts) + text[last:] if parts else text
