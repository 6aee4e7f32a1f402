"""Gated windows, open and closed events and acknowledgements on the web page: the API over a
real Redis, then the pages in headless Chromium (under the server's CSP)."""

from __future__ import annotations

import httpx

from connectors.client import SlowFastClient
from pipeline.web.server import WebServer
from tests.support.events import QUESTION, seed_events as seed
from tests.test_web_browser import new_page


def test_the_api_shows_open_and_closed_events_and_takes_acknowledgements(redis_url, web_server):
    seeded = seed(redis_url)
    api = httpx.Client(base_url=web_server.url, timeout=10)
    (summary,) = api.get("/api/streams").json()
    assert summary["caption"]["unchanged_since_window"] == 4
    # openings and closings, newest first; the open event's update is not among them
    assert [(e["window"], e["phase"]) for e in summary["events"]] == [(3, "opened"), (2, "closed"), (1, "opened")]
    (open_event,) = summary["open_events"]
    assert (open_event["event_id"], open_event["window"], open_event["ack"]) == (seeded["open"], 4, None)
    assert open_event["snapshot_url"].endswith(f"/snapshots/{seeded['run'] + 3}-0.jpg")  # its first window's
    assert api.get(open_event["snapshot_url"]).status_code == 200

    path = f"/api/streams/gate/events/{seeded['closed']}/ack"
    acked = api.post(path, json={"by": "Dana", "note": "the van was expected"})
    assert acked.status_code == 200 and acked.json()["by"] == "Dana"
    events = api.get("/api/streams/gate/events").json()
    assert {e["window"]: (e["ack"] or {}).get("by") for e in events} == {1: "Dana", 2: "Dana", 3: None, 4: None}
    assert SlowFastClient(redis_url).acks("gate")[seeded["closed"]].note == "the van was expected"

    missing = api.post("/api/streams/gate/events/vehicle:1:99/ack", json={})
    assert missing.status_code == 404 and "no event 'vehicle:1:99'" in missing.json()["detail"]
    assert api.post(path, json={"by": "x" * 201}).status_code == 422
    assert api.post(path, content="by=eve", headers={"content-type": "application/x-www-form-urlencoded"}).status_code == 422
    assert api.post(f"/api/streams/nope/events/{seeded['closed']}/ack", json={}).status_code == 404

    guarded = WebServer(redis_url, "0.0.0.0", 0, token="s3cret").start()
    try:
        url = f"http://127.0.0.1:{guarded.port}/api/streams/gate/events/{seeded['open']}/ack"
        assert httpx.post(url, json={"by": "mallory"}).status_code == 401
        assert seeded["open"] not in SlowFastClient(redis_url).acks("gate")
        assert httpx.post(url, json={"by": "Sam"}, headers={"x-slowfast-token": "s3cret"}).status_code == 200
    finally:
        guarded.stop()


def test_the_pages_show_gated_windows_open_and_closed_events_and_acknowledge_one(browser, web_server, redis_url):
    seeded = seed(redis_url)
    page = new_page(browser, height=900)
    try:
        page.goto(web_server.url)

        def clock(unix_s: float) -> str:  # the page's own time of day, in the browser's locale
            return page.evaluate("t => clock(t)", unix_s)

        unchanged = f"unchanged since {clock(seeded['wall'][4])} (window 4)"
        card = page.locator(".card[data-stream='gate']")
        card.locator(".unchanged").wait_for(timeout=15000)
        assert card.locator(".caption").text_content() == "caption of window 4"
        assert card.locator(".unchanged").text_content() == unchanged
        assert "alert" in card.get_attribute("class")  # an open event nobody acknowledged
        assert card.locator(".alert-title").text_content() == "1 open event"
        lines = card.locator(".events li").all_text_contents()
        assert f"open since {clock(seeded['wall'][3])}{QUESTION} → Yes, a truck." in lines[0]
        assert any(f"closed (open {clock(seeded['wall'][1])}–{clock(seeded['wall'][2])})" in line for line in lines)

        page.goto(web_server.url + "streams/gate")
        page.wait_for_selector(".timeline li.gated", timeout=15000)
        assert page.locator(".timeline li.gated .unchanged").text_content() == unchanged
        assert page.locator("#latest-unchanged").text_content() == unchanged
        assert page.locator(".timeline li.gated").count() == 1
        page.wait_for_selector("#open-events .event-row", timeout=15000)
        open_row = page.locator("#open-events .event-row")
        assert open_row.count() == 1 and open_row.get_attribute("data-event") == seeded["open"]
        assert f"open since {clock(seeded['wall'][3])}" in open_row.locator(".phase").text_content()
        page.wait_for_selector("#events .event-row", timeout=15000)
        phases = [row.get_attribute("class").split("phase-")[1].split()[0]
                  for row in page.locator("#events .event-row").all()]
        assert phases == ["opened", "closed", "opened"]  # the open event's update is not listed
        assert "gated (unchanged)" in page.locator("#stats").text_content()
        assert "1 event notifications not delivered" in page.locator("#last-error").text_content()

        page.fill("#ack-by", "Dana")
        open_row.locator("button.ack").click()
        page.wait_for_selector("#open-events .acked", timeout=15000)
        assert page.locator("#open-events .acked").text_content().startswith("acknowledged by Dana at ")
        ack = SlowFastClient(redis_url).acks("gate")[seeded["open"]]
        assert ack.by == "Dana"
        page.wait_for_function("() => document.querySelectorAll('#events .acked').length === 1", timeout=15000)

        page.goto(web_server.url)
        card = page.locator(".card[data-stream='gate']")
        card.locator(".acked").wait_for(timeout=15000)
        assert "alert" not in card.get_attribute("class") and "open" in card.get_attribute("class")
        assert page.errors == []
    finally:
        page.context.close()
