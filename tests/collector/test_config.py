"""Collector settings: defaults, and errors that name the key."""
from __future__ import annotations

import pytest

from collector.config import CollectorSettings
from common.config import ConfigError, load


def test_defaults_match_the_interface_contract():
    settings = load(CollectorSettings, section="collector", env={})
    assert (settings.host, settings.port, settings.workers) == ("127.0.0.1", 8080, 1)
    assert settings.linger_ms == 200 and settings.max_payload_bytes == 1_000_000
    assert settings.raw_stream == "clickstream-raw" and settings.bad_stream == "clickstream-bad"


@pytest.mark.parametrize("key, value", [("CLICKSTREAM_FSYNC", "sometimes"), ("CLICKSTREAM_SINK", "kafka"),
                                        ("CLICKSTREAM_CUSTOM_PATHS", "/a=/nowhere"),
                                        ("CLICKSTREAM_MAX_PAYLOAD_BYTES", "2000000"),
                                        ("CLICKSTREAM_LINGER_MS", "0"),
                                        ("CLICKSTREAM_BAD_PAYLOAD_KEEP_BYTES", "3000000")])
def test_bad_values_name_the_key(key, value):
    with pytest.raises(ConfigError, match=key):
        load(CollectorSettings, section="collector", env={key: value})


def test_custom_paths_map_onto_standard_paths():
    settings = load(CollectorSettings, section="collector",
                    env={"CLICKSTREAM_CUSTOM_PATHS": "/t=/com.snowplowanalytics.snowplow/tp2, /p=/i"})
    assert settings.path_map() == {"/t": "/com.snowplowanalytics.snowplow/tp2", "/p": "/i"}
