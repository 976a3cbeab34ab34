"""The live page's HTTP server on a loopback port (no broker), its settings and its command."""

from __future__ import annotations

import base64
import http.client
import json
import re
import time
import tomllib
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from consumer.cli import main, masked_settings
from consumer.config import ConfigError, load_settings
from consumer.dashboard.app import start_dashboard
from consumer.dashboard.live import LiveSummaries
from consumer.dashboard.server import DashboardServer, static_file
from consumer.dashboard.store import SummaryStore
from tests.support.summaries import window_summary

REPO = Path(__file__).resolve().parents[2]
STATIC = REPO / "consumer" / "dashboard" / "static"
TOKEN = "s3cret-s3cret-s3cret"
T0 = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)

Serve = Callable[..., tuple[DashboardServer, LiveSummaries]]


@pytest.fixture
def serve() -> Iterator[Serve]:
    """serve(token=None, healthy=True) -> (a running server on a free port, its summaries)."""
    servers: list[DashboardServer] = []

    def start(
        token: str | None = None, healthy: bool = True
    ) -> tuple[DashboardServer, LiveSummaries]:
        live = LiveSummaries(SummaryStore(timedelta(minutes=10), 8), "emotions.summaries")
        live.add(window_summary("cam-a", T0, {"happy": 3, "sad": 1}, skipped=1))
        status = (healthy, "reading" if healthy else "summaries reader stopped: boom")
        server = DashboardServer(
            "127.0.0.1", 0, live, lambda: status, auth_token=token, keepalive_s=0.1
        ).start()
        servers.append(server)
        return server, live

    yield start
    for server in servers:
        server.close()


def get(
    server: DashboardServer, path: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        reply = conn.getresponse()
        return reply.status, {k.lower(): v for k, v in reply.getheaders()}, reply.read()
    finally:
        conn.close()


def test_the_snapshot_and_the_probe(serve: Serve) -> None:
    server, _ = serve()
    code, headers, body = get(server, "/api/summaries")
    assert code == 200 and headers["content-type"] == "application/json"
    snapshot = json.loads(body)
    (stream,) = snapshot["streams"]
    assert stream["stream_id"] == "cam-a"
    (window,) = stream["windows"]
    assert (window["faces"], window["labels"]["happy"]["faces"]) == (5, 3)
    assert get(server, "/healthz")[0] == 200
    assert get(server, "/nothing-here")[0] == 404


def test_the_probe_fails_when_the_reader_stopped(serve: Serve) -> None:
    server, _ = serve(healthy=False)
    code, _, body = get(server, "/healthz")
    assert code == 503 and b"boom" in body


def test_the_page_and_its_files_are_served_from_the_package_with_a_strict_policy(
    serve: Serve,
) -> None:
    server, _ = serve()
    code, headers, body = get(server, "/")
    assert code == 200 and headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in headers["content-security-policy"]
    assert headers["x-content-type-options"] == "nosniff"
    assert b'src="dashboard.js"' in body and b'href="dashboard.css"' in body
    for path, kind in (("/dashboard.js", "text/javascript"), ("/dashboard.css", "text/css")):
        code, headers, _ = get(server, path)
        assert code == 200 and headers["content-type"].startswith(kind), path
    assert get(server, "/../pyproject.toml")[0] == 404


def test_nothing_is_loaded_from_elsewhere() -> None:
    """No CDN, no web fonts: the only absolute URL is the SVG namespace name."""
    for name in ("index.html", "dashboard.js", "dashboard.css"):
        text = static_file(name).decode()
        urls = set(re.findall(r"(?:https?:)?//[\w.-]+\.[a-z]{2,}[^\s\"')]*", text))
        assert urls <= {"http://www.w3.org/2000/svg"}, (name, urls)
        assert "@import" not in text and "<link" not in text.replace(
            '<link rel="stylesheet" href="dashboard.css">', ""
        )


def test_the_wheel_includes_the_page() -> None:
    """pyproject's package-data patterns cover every file of static/."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = pyproject["tool"]["setuptools"]["package-data"]["consumer.dashboard"]
    files = sorted(p.relative_to(STATIC.parent) for p in STATIC.iterdir())
    assert files, "static/ is empty"
    for path in files:
        assert any(path.match(pattern) for pattern in patterns), f"{path} is not in the wheel"


def test_a_foreign_host_name_is_refused_without_a_token(serve: Serve) -> None:
    """DNS rebinding: another site's name pointed at 127.0.0.1 cannot read the page."""
    server, _ = serve()
    assert get(server, "/api/summaries", {"Host": "evil.example:8080"})[0] == 403
    assert get(server, "/api/summaries", {"Host": f"localhost:{server.port}"})[0] == 200


def test_with_a_token_every_path_but_the_probe_needs_it(serve: Serve) -> None:
    server, _ = serve(token=TOKEN)
    for path in ("/", "/api/summaries", "/events", "/dashboard.js"):
        code, headers, body = get(server, path)
        assert code == 401, path
        assert headers["www-authenticate"].startswith("Basic realm="), "the browser asks"
        assert b"cam-a" not in body
    assert get(server, "/api/summaries", {"Authorization": "Bearer wrong-wrong-wrong"})[0] == 401
    assert get(server, "/api/summaries", {"Authorization": f"Bearer {TOKEN}"})[0] == 200
    basic = base64.b64encode(f"me:{TOKEN}".encode()).decode()
    assert get(server, "/api/summaries", {"Authorization": f"Basic {basic}"})[0] == 200
    # With a token the Host header is free (a Service name, an ingress host).
    headers = {"Authorization": f"Bearer {TOKEN}", "Host": "dashboard.example"}
    assert get(server, "/api/summaries", headers)[0] == 200
    assert get(server, "/healthz")[0] == 200, "the kubelet's probe carries no token"


def _next_event(reply: http.client.HTTPResponse) -> tuple[str | None, str]:
    """(event name, data) of the next event, skipping comments and the retry field."""
    name, data = None, []
    while True:
        line = reply.fp.readline().decode().rstrip("\n")
        if line.startswith("event: "):
            name = line[len("event: ") :]
        elif line.startswith("data: "):
            data.append(line[len("data: ") :])
        elif line == "" and data:
            return name, "\n".join(data)


def test_events_send_the_snapshot_then_each_new_summary_and_let_go_of_a_closed_page(
    serve: Serve,
) -> None:
    server, live = serve()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("GET", "/events")
    reply = conn.getresponse()
    assert reply.status == 200
    assert reply.getheader("Content-Type", "").startswith("text/event-stream")
    name, data = _next_event(reply)
    assert name == "snapshot"
    assert [s["stream_id"] for s in json.loads(data)["streams"]] == ["cam-a"]
    live.add(window_summary("cam-b", T0, {"angry": 2}))
    name, data = _next_event(reply)
    assert name == "summary"
    assert (json.loads(data)["stream_id"], json.loads(data)["faces"]) == ("cam-b", 2)
    # Idle: keep-alive comments (every keepalive_s, 0.1 s here).
    assert reply.fp.readline() == b": keep-alive\n"
    assert live.open_pages == 1
    reply.close()  # the response holds the socket too: both, as a closed tab does
    conn.close()
    # The next keep-alive write fails and the server forgets the page.
    deadline = time.monotonic() + 10
    while live.open_pages:
        assert time.monotonic() < deadline, "the closed page was never unsubscribed"
        time.sleep(0.1)


def test_closing_the_server_ends_open_event_streams(serve: Serve) -> None:
    server, _ = serve()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("GET", "/events")
    reply = conn.getresponse()
    assert _next_event(reply)[0] == "snapshot"
    server.close()
    rest = reply.read()  # returns at the end of the stream, not after the 10 s timeout
    assert b"event: summary" not in rest
    conn.close()


# ------------------------------------------------------------------ settings and command


def test_defaults_keep_the_page_on_this_machine() -> None:
    settings = load_settings(None, {})
    assert settings.dashboard.host == "127.0.0.1"
    assert settings.dashboard.port == 8080
    assert settings.summarize.summaries_topic == "emotions.summaries"  # what it reads
    assert settings.dashboard.history_minutes == 10
    assert settings.dashboard.auth_token is None


def test_the_token_comes_from_the_environment_and_is_never_shown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("EMOTION_WORKER_DASHBOARD__AUTH_TOKEN", TOKEN)
    settings = load_settings(None, {"dashboard": {"host": "0.0.0.0"}})
    assert settings.dashboard.auth_token is not None
    assert settings.dashboard.auth_token.get_secret_value() == TOKEN
    assert TOKEN not in json.dumps(masked_settings(settings))
    assert TOKEN not in repr(settings)


def test_a_short_token_is_refused_without_echoing_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMOTION_WORKER_DASHBOARD__AUTH_TOKEN", "short")
    with pytest.raises(ConfigError) as caught:
        load_settings(None, {})
    assert "dashboard.auth_token" in str(caught.value) and "at least 16" in str(caught.value)
    assert "short" not in str(caught.value).replace("at least", "")


def test_the_network_without_a_token_refuses_to_start() -> None:
    settings = load_settings(None, {"dashboard": {"host": "0.0.0.0", "port": 0}})
    with pytest.raises(ConfigError, match=r"dashboard\.auth_token"):
        start_dashboard(settings)


def test_the_command_says_what_to_set(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dashboard", "--host", "0.0.0.0", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "configuration error" in err and "dashboard.auth_token" in err
    assert "EMOTION_WORKER_DASHBOARD__AUTH_TOKEN" in err


def test_a_busy_port_names_the_setting() -> None:
    live = LiveSummaries(SummaryStore(timedelta(minutes=1), 1), "t")
    first = DashboardServer("127.0.0.1", 0, live, lambda: (True, "")).start()
    try:
        with pytest.raises(ConfigError, match=r"dashboard\.port"):
            DashboardServer("127.0.0.1", first.port, live, lambda: (True, ""))
    finally:
        first.close()


def test_help_lists_the_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["dashboard", "--help"])
    assert caught.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--config", "--bootstrap-servers", "--host", "--port"):
        assert flag in out
