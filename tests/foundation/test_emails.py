"""common.emails: addresses in URLs and free text, decoded, bounded, in linear time."""
from __future__ import annotations

import threading

import pytest

from common import emails


def marked(text: str) -> str:
    return emails.replace(text, lambda address: f"<{address}>")


@pytest.mark.parametrize(("text", "expected"), [
    ("/users/carol@example.org/orders", "/users/<carol@example.org>/orders"),
    ("email=alice%40example.com&x=1", "email=<alice@example.com>&x=1"),
    ("utm_term=alice%2Bshop%40example.com", "utm_term=<alice+shop@example.com>"),        # decoded, + kept
    ("next=%2Faccount%3Femail%3Dalice%40example.com", "next=%2Faccount%3Femail%3D<alice@example.com>"),
    ("Orders of alice@example.com.", "Orders of <alice@example.com>."),
    ("q=order+alice%40example.com", "q=<order+alice@example.com>"),      # a form-encoded space goes with it
    # A return URL inside a URL's query: the address is encoded twice.
    ("next=https%3A%2F%2Fs.test%2Fa%3Femail%3Dalice%2540example.com", "next=https%3A%2F%2Fs.test%2Fa%3Femail%3D<alice@example.com>"),
    ("email=franz.m%C3%BCller%40example.de", "email=<franz.müller@example.de>"),  # UTF-8 escapes, all of it
    ("email=sean.o'brien@example.ie", "email=<sean.o'brien@example.ie>"),
    ("email=sean.o%27brien%40example.ie", "email=<sean.o'brien@example.ie>"),
    ("/u/alice@example.com_orders", "/u/<alice@example.com>_orders"),
    ("/img/logo@2x.png", "/img/logo@2x.png"),                            # an asset name, not an address
    ("a@b", "a@b"), ("x@@y.com", "x@@y.com"), ("@example.com", "@example.com"), ("no address", "no address"),
])
def test_addresses_are_found_decoded_and_nothing_else(text, expected):
    assert marked(text) == expected
    assert emails.contains(text) == (text != expected)


def test_a_megabyte_of_hostile_text_is_read_in_one_pass():
    """A run of letters ending in @ made a plain regex quadratic: hours for one 1 MB URL."""
    hostile = ["?q=" + "a" * 1_000_000 + "@", "a%40" * 250_000, "a@" * 500_000, "@" + "a." * 500_000]
    done = []
    runner = threading.Thread(target=lambda: done.extend(marked(text) for text in hostile), daemon=True)
    runner.start()
    runner.join(60)                         # a liveness bound, not a speed target: it takes about a second
    assert len(done) == 4 and done[2].count("<") == 0
