"""Backpressure on the in-memory broker's consumer: pause at the limits, resume below the mark."""

from __future__ import annotations

import time

from confluent_kafka import TopicPartition

from consumer.config import FlowSettings
from consumer.stream.backpressure import Backpressure
from consumer.stream.memory_broker import MemoryBroker
from consumer.stream.memory_consumer import MemoryConsumer

TOPIC = "frames"
FLOW = FlowSettings(max_in_flight=10, resume_below=4, max_in_flight_bytes=2000)


def _assigned_consumer(broker: MemoryBroker, partitions: int = 2) -> MemoryConsumer:
    broker.create_topic(TOPIC, partitions)
    consumer = broker.consumer(
        {
            "group.id": "g",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "partition.assignment.strategy": "cooperative-sticky",
        }
    )
    consumer.subscribe([TOPIC])
    deadline = time.monotonic() + 5
    while len(consumer.assignment()) < partitions:
        assert time.monotonic() < deadline, "no assignment"
        consumer.consume(1, timeout=0.02)
    return consumer


def test_pauses_at_the_event_limit_and_resumes_only_below_the_mark() -> None:
    consumer = _assigned_consumer(MemoryBroker())
    pressure = Backpressure(FLOW)
    pressure.apply(consumer, events=9, held_bytes=0)
    assert consumer.paused() == [] and not pressure.paused
    pressure.apply(consumer, events=10, held_bytes=0)
    assert consumer.paused() == [(TOPIC, 0), (TOPIC, 1)] and pressure.paused
    pressure.apply(consumer, events=5, held_bytes=0)  # between the marks: stays paused
    assert pressure.paused and len(consumer.paused()) == 2
    pressure.apply(consumer, events=4, held_bytes=0)
    assert consumer.paused() == [] and not pressure.paused


def test_bytes_in_flight_pause_too_and_resume_needs_half_of_the_byte_limit() -> None:
    consumer = _assigned_consumer(MemoryBroker())
    pressure = Backpressure(FLOW)
    pressure.apply(consumer, events=1, held_bytes=2000)
    assert pressure.paused and len(consumer.paused()) == 2
    pressure.apply(consumer, events=0, held_bytes=1000)  # few events, but bytes still high
    assert pressure.paused
    pressure.apply(consumer, events=0, held_bytes=999)
    assert not pressure.paused and consumer.paused() == []


def test_room_is_what_the_event_limit_leaves() -> None:
    pressure = Backpressure(FLOW)
    assert pressure.room(0) == 10
    assert pressure.room(7) == 3
    assert pressure.room(12) == -2  # over the limit (a batch came in whole): no room


def test_a_new_assignment_follows_the_current_state() -> None:
    consumer = _assigned_consumer(MemoryBroker(), partitions=1)
    pressure = Backpressure(FLOW)
    pressure.apply(consumer, events=10, held_bytes=0)
    assert consumer.paused() == [(TOPIC, 0)]
    consumer.resume(consumer.assignment())  # as if the partition were assigned afresh
    pressure.apply(consumer, events=10, held_bytes=0)
    assert consumer.paused() == []  # no change of state: nothing re-applied...
    pressure.assigned()
    pressure.apply(consumer, events=10, held_bytes=0)
    assert consumer.paused() == [(TOPIC, 0)]  # ...until an assignment says so


def test_departing_partitions_lose_their_pause_flag() -> None:
    consumer = _assigned_consumer(MemoryBroker())
    pressure = Backpressure(FLOW)
    pressure.apply(consumer, events=10, held_bytes=0)
    assert len(consumer.paused()) == 2
    pressure.departed(consumer, [TopicPartition(TOPIC, 1)])
    assert consumer.paused() == [(TOPIC, 0)]
