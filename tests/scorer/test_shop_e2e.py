"""The whole loop from a person's point of view: click through the demo shop in headless Chromium
(official @snowplow/browser-tracker) → collector → enricher → scorer with a model trained by the
`make train` code → the live view, and the shop page shows its own session's prediction."""
from __future__ import annotations

import json
import urllib.request

import pytest

from tests.demo.test_shop import browser, put_a_shoe_in_the_cart  # noqa: F401 - browser: the headless Chromium fixture
from tests.scorer.conftest import MODEL
from tests.scorer.helpers import free_port, publish, wait_for
from tests.scorer.test_e2e import _component, _up


def _session(url: str) -> dict | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return json.load(response)
    except OSError:
        return None


@pytest.mark.spark
@pytest.mark.browser
def test_a_shopper_sees_their_own_session_scored_live(browser, trained, aws_settings, s3,  # noqa: F811
                                                      start_scorer, tmp_path):
    settings = aws_settings
    result, _ = trained
    publish(s3, settings.bucket, MODEL, "shop-v1", result.onnx_bytes, dict(result.meta, version="shop-v1"))
    collector_port, view_port = free_port(), free_port()
    log = open(tmp_path / "pipeline.log", "ab")  # noqa: SIM115 - shared by the children until the end
    no_metrics = {f"{name}_metrics_url": "" for name in ("collector", "enrich", "scorer", "loader", "discount")}
    processes = [
        _component("collector", settings, log, port=collector_port, spool_dir=tmp_path / "spool", linger_ms=50,
                   cookie_secure="false"),
        _component("enrich", settings, log, pseudonymisation_key="shop-pseudonymisation-key", lease_ms=3000),
        _component("demo.liveview", settings, log, port=view_port, model_name=MODEL, count_streams="false",
                   **no_metrics),
    ]
    try:
        wait_for(lambda: _up(f"http://127.0.0.1:{collector_port}/health"), 60, what="collector")
        wait_for(lambda: _up(f"http://127.0.0.1:{view_port}/health"), 60, what="live view")
        start_scorer(settings).wait_ready()

        shop = f"http://127.0.0.1:{view_port}/shop/?collector=http://127.0.0.1:{collector_port}"
        browser.go(shop)
        put_a_shoe_in_the_cart(browser)
        session_id = browser.text("#session-id")
        assert len(session_id) == 36                       # the tracker's domain session id (a UUID)

        # The page polls the live view for its own session and shows the scorer's answer.
        browser.wait("return document.getElementById('p-buy').textContent.startsWith('p(buy)')", timeout=90)

        def page_shows_the_latest():              # the page catches up with every event the live view scored
            found = _session(f"http://127.0.0.1:{view_port}/api/session/{session_id}")
            shown = browser.text("#my-prediction")
            # Home, category, product page views + product/cart events: the page and the live view may
            # agree on an earlier one while later events are still on their way through the pipeline.
            return found and found["events"] >= 4 and f" after {found['events']} events " in shown and (found, shown)
        found, shown = wait_for(page_shows_the_latest, 60, what="the page to show the session's latest prediction")
        assert found["model_version"] == "shop-v1"
        assert 0.0 <= found["p_buy"] <= 1.0
        assert f"p(buy) {found['p_buy']:.3f} after {found['events']} events (model shop-v1)" in shown
        assert shown.split(")")[-1].strip().startswith(found["decision"])
    finally:
        for process in processes:
            process.terminate()
            process.wait(20)
        log.close()
