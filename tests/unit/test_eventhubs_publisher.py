"""The Event Hubs publisher's batching, with the SDK's real EventDataBatch and a recording
producer in place of the network (the integration tests use a real AMQP server)."""

from __future__ import annotations

from typing import Any

from azure.eventhub import EventDataBatch
from azure.eventhub import exceptions as eh

from gateway.errors import MessageRejected, RetryableError, UplinkUnavailable
from gateway.message import ATTR_MESSAGE_ID, ATTR_MQTT_TOPIC, QueueMessage, new_message_id
from gateway.queue.keys import KeyTemplate
from gateway.uplinks.eventhubs.publisher import Publisher, event_properties, partition_key


class Refusal(Exception):
    def __init__(self, condition: bytes) -> None:
        super().__init__(condition)
        self.condition = condition
        self.description = b"refused by the test"


class RecordingProducer:
    """create_batch/send_batch as the SDK's producer client; ``failures`` are raised by the
    next sends, in order (None = that send succeeds)."""

    def __init__(self, max_size: int = 2048, failures: list[BaseException | None] | None = None) -> None:
        self.max_size = max_size
        self.failures = list(failures or [])
        self.sent: list[tuple[str | None, list[str]]] = []  # (partition key, message ids)

    async def create_batch(self, *, partition_key: str | None = None) -> EventDataBatch:
        return EventDataBatch(max_size_in_bytes=self.max_size, partition_key=partition_key)

    async def send_batch(self, batch: EventDataBatch, *, timeout: float | None = None) -> None:
        if self.failures:
            failure = self.failures.pop(0)
            if failure is not None:
                raise failure
        ids = [event.properties[ATTR_MESSAGE_ID] for event in batch._internal_events]
        self.sent.append((batch._partition_key, ids))


def msg(topic: str, size: int = 10, **attrs: str) -> QueueMessage:
    return QueueMessage(new_message_id(), b"x" * size, {ATTR_MQTT_TOPIC: topic, **attrs})


async def publish(producer: RecordingProducer, messages: list[QueueMessage],
                  template: str = "{topic}") -> list[Any]:
    publisher = Publisher(KeyTemplate.parse(template), send_timeout=5.0)
    return await publisher.publish_batch(producer, "hub", messages)


async def test_one_batch_per_partition_key_in_input_order() -> None:
    producer = RecordingProducer()
    batch = [msg("s/a"), msg("s/b"), msg("s/a"), msg("s/b"), msg("s/c")]
    results = await publish(producer, batch)
    assert [r.message_id for r in results] == [m.id for m in batch]
    assert all(r.ok for r in results)
    assert producer.sent == [("s/a", [batch[0].id, batch[2].id]),
                             ("s/b", [batch[1].id, batch[3].id]), ("s/c", [batch[4].id])]


async def test_key_template_over_topic_levels_and_no_key() -> None:
    producer = RecordingProducer()
    batch = [msg("site/dev-1/temp"), msg("site/dev-1/hum"), msg("site/dev-2/temp")]
    await publish(producer, batch, "{topic[1]}")
    assert [key for key, _ in producer.sent] == ["dev-1", "dev-2"]
    producer = RecordingProducer()
    await publish(producer, batch, "")
    assert producer.sent == [(None, [m.id for m in batch])]
    assert partition_key(KeyTemplate.parse("{topic}"), QueueMessage("i", b"")) is None


async def test_a_full_batch_is_sent_and_a_new_one_started() -> None:
    producer = RecordingProducer(max_size=1024)
    batch = [msg("s/a", size=300) for _ in range(7)]
    results = await publish(producer, batch)
    assert all(r.ok for r in results)
    assert len(producer.sent) >= 3
    assert [mid for _, ids in producer.sent for mid in ids] == [m.id for m in batch]  # order kept
    assert all(len(ids) <= 3 for _, ids in producer.sent)


async def test_an_event_larger_than_the_hub_accepts_fails_alone() -> None:
    producer = RecordingProducer(max_size=1024)
    batch = [msg("s/a"), msg("s/a"), msg("s/a", size=5000), msg("s/a"), msg("s/b", size=2000)]
    results = await publish(producer, batch)
    assert [r.ok for r in results] == [True, True, False, True, False]
    for bad in (results[2], results[4]):
        assert isinstance(bad.error, MessageRejected)
        assert "larger than the hub 'hub' accepts (1024 bytes)" in str(bad.error)
    assert producer.sent == [("s/a", [batch[0].id, batch[1].id, batch[3].id])]


async def test_a_batch_the_service_refuses_as_too_large_is_split_to_find_the_guilty_one() -> None:
    too_large = eh.EventDataSendError("send failed", Refusal(b"amqp:link:message-size-exceeded"))
    producer = RecordingProducer(failures=[too_large, None, too_large, None])
    batch = [msg("s/a"), msg("s/a"), msg("s/a")]
    results = await publish(producer, batch)
    assert [r.ok for r in results] == [True, False, True]
    assert isinstance(results[1].error, MessageRejected)
    assert producer.sent == [("s/a", [batch[0].id]), ("s/a", [batch[2].id])]


async def test_unreachable_stops_everything_not_yet_sent() -> None:
    producer = RecordingProducer(failures=[None, eh.ConnectionLostError("gone")])
    batch = [msg("s/a"), msg("s/b"), msg("s/c"), msg("s/a")]
    results = await publish(producer, batch)
    assert results[0].ok and results[3].ok  # the s/a batch went first
    assert all(isinstance(r.error, UplinkUnavailable) for r in results[1:3])
    assert producer.sent == [("s/a", [batch[0].id, batch[3].id])]


async def test_refused_credentials_never_dead_letter_messages() -> None:
    producer = RecordingProducer(failures=[eh.AuthenticationError("token rejected")])
    results = await publish(producer, [msg("s/a"), msg("s/b")])
    assert all(type(r.error) is UplinkUnavailable for r in results)
    assert all("authentication failed" in str(r.error) for r in results)


async def test_a_retryable_refusal_fails_its_key_and_the_others_go_on() -> None:
    busy = eh.EventDataSendError("send failed", Refusal(b"com.microsoft:server-busy"))
    producer = RecordingProducer(max_size=1024, failures=[busy])
    batch = [msg("s/a", size=400), msg("s/a", size=400), msg("s/a", size=400), msg("s/b")]
    results = await publish(producer, batch)
    # the first s/a batch was refused: it and everything behind it in s/a fail (order)
    assert [type(r.error) for r in results[:3]] == [RetryableError] * 3
    assert results[3].ok
    assert producer.sent == [("s/b", [batch[3].id])]


def test_properties_carry_id_topic_and_every_attribute() -> None:
    m = QueueMessage("id-1", b"", {ATTR_MQTT_TOPIC: "t", "content_type": "application/json",
                                   ATTR_MESSAGE_ID: "spoofed"})
    assert event_properties(m) == {ATTR_MESSAGE_ID: "id-1", ATTR_MQTT_TOPIC: "t",
                                   "content_type": "application/json"}
