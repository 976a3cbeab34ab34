"""Wires the page: the store, the summaries reader and the HTTP server (`start_dashboard`)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import structlog

from consumer.config import ConfigError, WorkerSettings
from consumer.dashboard.auth import exposure_problem
from consumer.dashboard.live import LiveSummaries
from consumer.dashboard.reader import SummaryReader
from consumer.dashboard.server import DashboardServer
from consumer.dashboard.store import SummaryStore

log = structlog.get_logger("consumer.dashboard")


@dataclass(frozen=True)
class Dashboard:
    """A running page: where it is, what it holds, and how to stop it."""

    url: str
    live: LiveSummaries
    reader: SummaryReader
    server: DashboardServer

    def stop(self) -> None:
        """Close the open pages, the HTTP server and the Kafka reader; idempotent."""
        if not self.server.stopping:
            self.server.close()
            self.reader.close()
            log.info("dashboard stopped", url=self.url)


def start_dashboard(settings: WorkerSettings) -> Dashboard:
    """Serve the page for `settings.dashboard`, reading `settings.kafka`'s cluster.

    Returns once the port is bound (the reader connects in the background; the page shows
    summaries as they come). Raises ConfigError, naming the setting, when the address
    cannot be bound or would serve the page to the network without a token.
    """
    dashboard = settings.dashboard
    problem = exposure_problem(dashboard)
    if problem is not None:
        raise ConfigError(problem)
    store = SummaryStore(timedelta(minutes=dashboard.history_minutes), dashboard.max_streams)
    live = LiveSummaries(store, settings.summarize.summaries_topic)
    reader = SummaryReader(
        settings.kafka, settings.summarize.summaries_topic, dashboard.history_minutes * 60, live.add
    )
    token = dashboard.auth_token.get_secret_value() if dashboard.auth_token else None
    server = DashboardServer(dashboard.host, dashboard.port, live, reader.status, token)
    reader.start()
    server.start()
    log.info(
        "dashboard listening",
        url=server.url,
        host=dashboard.host,
        port=server.port,
        topic=settings.summarize.summaries_topic,
        bootstrap_servers=settings.kafka.bootstrap_servers,
        history_minutes=dashboard.history_minutes,
        auth="token" if token else "none (loopback only)",
    )
    return Dashboard(server.url, live, reader, server)
