"""Settings of ``type: sqs``: the seed's two keys verbatim, plus what real deployments need.

Every key sits flat under ``queue:`` (``OPENHQM_QUEUE__<KEY>`` overrides it). Credentials are
never keys here: they come from the standard AWS chain (environment, shared credentials and
config files with ``sqs_profile``, ``credential_process`` for the AWS IoT credentials
provider, container and instance roles). Imports no SDK. docs/uplinks/sqs.md explains each
key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from gateway.settings import DURATION, SIZE

#: SQS's classic limit on one message and on one SendMessageBatch call (256 KiB)
SQS_MAX_MESSAGE_SIZE = 262_144


@dataclass(frozen=True, slots=True)
class SqsSettings:
    sqs_region: str = "us-east-1"
    #: the URL of ``queue.request_queue_name`` (no GetQueueUrl call needed for it)
    sqs_queue_url: str = ""
    #: another endpoint: an SQS-compatible server, a VPC interface endpoint, a FIPS endpoint
    endpoint_url: str = ""
    #: a profile of the shared AWS config/credentials files; '' = the default chain
    sqs_profile: str = ""
    #: publishing to (or consuming from) a queue that does not exist creates it, with
    #: ``sqs_queue_attributes``. Off: a missing queue is UplinkUnavailable until it exists.
    sqs_auto_create_queues: bool = False
    #: SQS queue attributes for queues the gateway creates (VisibilityTimeout, KmsMasterKeyId...)
    sqs_queue_attributes: dict[str, str] = field(default_factory=dict)
    #: FIFO queues: the MessageGroupId (order is kept per group). Placeholders: {topic},
    #: {topic[N]}, {attr:NAME}, {id}. Empty renders as "openhqm".
    sqs_message_group_id: str = "{topic}"
    #: a message (body + attributes, as sent) above this is refused by the gateway itself
    #: (MessageRejected: dead-lettered); also the bound of one SendMessageBatch call.
    #: AWS raised its limit to 1 MiB in 2025: raise this together with the queue's
    #: MaximumMessageSize to use it.
    sqs_max_message_size: Annotated[int, SIZE] = SQS_MAX_MESSAGE_SIZE
    #: SendMessageBatch calls of one publish_batch in flight at once (standard queues;
    #: FIFO queues send one call at a time to keep the order)
    sqs_max_concurrent_batches: int = 4
    #: consume(): how long a received message stays invisible to others while in flight
    sqs_visibility_timeout: Annotated[float, DURATION] = 30.0
    sqs_connect_timeout: Annotated[float, DURATION] = 5.0
    #: must exceed the longest long poll (20 s)
    sqs_read_timeout: Annotated[float, DURATION] = 25.0
    #: attempts per call inside the SDK (throttling, 5xx); the forwarder retries beyond
    sqs_max_attempts: int = 2
