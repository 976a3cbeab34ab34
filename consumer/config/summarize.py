"""`emotion-worker summarize`: windowed per-stream summaries of the results topic."""

from __future__ import annotations

from pydantic import Field, model_validator

from consumer.config.base import Section


class SummarizeSettings(Section):
    """The summarizer (`emotion-worker summarize`): its topics, group and windows.

    It connects with the `kafka` section's brokers and security settings
    (`kafka.common_config`, `consumer_config`, `producer_config`) and serves
    `/metrics`, `/readyz` and `/livez` on `health.host`:`health.port`.
    """

    results_topic: str | None = Field(
        default=None,
        min_length=1,
        max_length=249,
        description="Topic the results are read from. None: `kafka.output_topic`.",
    )
    summaries_topic: str = Field(
        default="emotions.summaries",
        min_length=1,
        max_length=249,
        description="Topic the window summaries are written to, keyed by `stream_id`.",
    )
    state_topic: str | None = Field(
        default=None,
        min_length=1,
        max_length=249,
        description=(
            "Compacted changelog of the open windows; needs at least as many partitions as "
            "the results topic. None: `<summaries_topic>.state`."
        ),
    )
    group_id: str = Field(
        default="emotion-summarizer",
        min_length=1,
        description=(
            "Consumer group of the summarizers (not the workers'); with "
            "`kafka.group_instance_id` it also names the transactional id."
        ),
    )
    window_s: float = Field(
        default=10.0,
        ge=0.001,
        le=86400,
        description="Length of the tumbling windows, by `captured_at`, in seconds.",
    )
    grace_s: float = Field(
        default=5.0,
        ge=0,
        le=86400,
        description=(
            "How long after its end (by the stream's latest `captured_at`) a window still "
            "takes late results, in seconds; later ones are dropped and counted."
        ),
    )
    idle_close_s: float = Field(
        default=30.0,
        gt=0,
        le=86400,
        description=(
            "A stream with no result for this long (wall clock, after its partition was "
            "read to its end) has its open windows closed, so a stream that stops still "
            "gets its last summary; in seconds."
        ),
    )
    max_clock_skew_s: float = Field(
        default=300.0,
        gt=0,
        description=(
            "Results whose `captured_at` is later than their `processed_at` by more than "
            "this (a camera clock in the future) are dropped and counted: one such result "
            "would otherwise close every window of its stream early. In seconds."
        ),
    )
    commit_interval_s: float = Field(
        default=1.0,
        gt=0,
        le=60,
        description=(
            "How often the closed windows' summaries, the changed window state and the "
            "consumed offsets are committed in one transaction, in seconds."
        ),
    )
    create_topics: bool = Field(
        default=True,
        description=(
            "Create the summaries and state topics at start when missing (the state topic "
            "compacted, with the results topic's partition count). `false`: they must exist."
        ),
    )

    @model_validator(mode="after")
    def _check_topics(self) -> SummarizeSettings:
        if self.results_topic is not None and self.results_topic == self.summaries_topic:
            raise ValueError("summarize.results_topic and summarize.summaries_topic are equal")
        if self.state_topic is not None and self.state_topic in (
            self.summaries_topic,
            self.results_topic,
        ):
            raise ValueError("summarize.state_topic must be a topic of its own")
        return self
