"""Settings of ``type: gcp_pubsub``: the seed's three keys verbatim, plus what real use needs.

Every key sits flat under ``queue:`` with the ``gcp_`` prefix like the seed's own keys, so
each has an environment override ``OPENHQM_QUEUE__GCP_<KEY>``. Imports no SDK.
docs/uplinks/pubsub.md explains each key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from gateway.errors import ConfigError
from gateway.settings import DURATION, SIZE

#: the service's limit on one publish request (data, attributes and ordering key)
MAX_REQUEST_BYTES = 10_000_000


@dataclass(frozen=True, slots=True)
class PubSubSettings:
    #: the project that owns the topics; '' = the project of the credentials
    gcp_project_id: str = ""
    #: a service account key file; None = Application Default Credentials
    #: (GOOGLE_APPLICATION_CREDENTIALS, gcloud login, the metadata server)
    gcp_credentials_path: str | None = None
    #: consume(): at most this many messages per pull (and never more than its batch_size)
    gcp_max_messages: int = 10

    #: "host:port" of a Pub/Sub emulator; '' = $PUBSUB_EMULATOR_HOST when set. With an
    #: emulator the connection is plaintext and anonymous.
    gcp_emulator_host: str = ""
    #: the subscription consume() reads for a queue: {queue} is the queue (topic) name
    gcp_subscription: str = "{queue}-openhqm"
    #: the ordering key of every message: {topic}, {topic[N]}, {attr:NAME}, {id} as for
    #: kafka_message_key. '' = no ordering key (and message ordering off in the publisher)
    gcp_ordering_key: str = "{topic}"
    #: create a missing topic on first use; when the uplink created the topic it also
    #: creates the subscription gcp_subscription names, so nothing published is dropped
    gcp_auto_create: bool = True
    #: ack deadline of the subscriptions the uplink creates (10s..600s)
    gcp_ack_deadline: Annotated[float, DURATION] = 60.0
    #: > 0: subscriptions the uplink creates get a dead-letter policy to the topic
    #: queue.dlq_name after this many delivery attempts (5..100). 0 = no policy.
    gcp_dead_letter_max_attempts: int = 0

    #: publisher batching: a batch is sent when it holds this many messages or bytes, or
    #: when its oldest message waited gcp_batch_max_latency
    gcp_batch_max_messages: int = 100
    gcp_batch_max_bytes: Annotated[int, SIZE] = 1024 * 1024
    gcp_batch_max_latency: Annotated[float, DURATION] = 0.01
    #: one publish request (one attempt; the forwarder does the retrying)
    gcp_publish_timeout: Annotated[float, DURATION] = 20.0
    #: pull, acknowledge, administration and health-check requests
    gcp_request_timeout: Annotated[float, DURATION] = 10.0


def check_settings(s: PubSubSettings) -> None:
    """Ranges the service accepts; ConfigError naming the key otherwise."""
    if s.gcp_max_messages < 1:
        raise ConfigError("queue.gcp_max_messages", s.gcp_max_messages, "must be at least 1")
    if not 10 <= s.gcp_ack_deadline <= 600:
        raise ConfigError("queue.gcp_ack_deadline", s.gcp_ack_deadline, "must be 10s..600s")
    if s.gcp_dead_letter_max_attempts and not 5 <= s.gcp_dead_letter_max_attempts <= 100:
        raise ConfigError("queue.gcp_dead_letter_max_attempts", s.gcp_dead_letter_max_attempts,
                          "must be 0 (no policy) or 5..100")
    if not 1 <= s.gcp_batch_max_messages <= 1000:
        raise ConfigError("queue.gcp_batch_max_messages", s.gcp_batch_max_messages,
                          "must be 1..1000")
    if not 1 <= s.gcp_batch_max_bytes <= MAX_REQUEST_BYTES:
        raise ConfigError("queue.gcp_batch_max_bytes", s.gcp_batch_max_bytes,
                          "must be 1 byte..10 MB")
    for key, value in (("gcp_publish_timeout", s.gcp_publish_timeout),
                       ("gcp_request_timeout", s.gcp_request_timeout)):
        if value <= 0:
            raise ConfigError(f"queue.{key}", value, "must be positive")
    rest = s.gcp_subscription.replace("{queue}", "")
    if not s.gcp_subscription or "{" in rest or "}" in rest:
        raise ConfigError("queue.gcp_subscription", s.gcp_subscription,
                          "a subscription name; the only placeholder is {queue}")
