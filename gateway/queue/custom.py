"""A template for your own uplink: copy this class into your package and fill in each method.

Select it in one of two ways (docs/writing-an-uplink.md has the whole checklist):

1. By module path, nothing to install but your module::

       queue:
         type: custom
         custom_module: mycompany.queues.custom_handler
         custom_class: MyCustomQueue
         custom_config:            # the constructor's keyword arguments
           connection_string: "myqueue://localhost:5672"
           option1: value1

   or ``OPENHQM_QUEUE__CUSTOM_CONFIG='{"connection_string": "...", "option1": "value1"}'``.

2. By entry point, as a pip-installable plugin with a ``queue.type`` of its own. In your
   pyproject.toml::

       [project.entry-points."openhqm_gateway.queues"]
       myqueue = "mycompany.queues.custom_handler:MyCustomQueue"

   and then ``queue: {type: myqueue, connection_string: ..., option1: ...}``: the
   constructor's parameters are the flat keys of the ``queue:`` section.

When the gateway loads the class it checks that it subclasses MessageQueueInterface and
implements every abstract method, and it checks your options against the constructor:
an unknown key is an error naming it, a parameter without a default is required, and
parameters annotated str/int/float/bool/Literal/Optional/list/dict are converted from YAML
or environment strings. Name every option as a parameter (``**kwargs`` is refused).
Parameter names containing password, secret, token, key or credential are masked in
``openhqm-gateway config check``; a ``connection_string`` or ``*url`` shows its address with
only the password or key masked.

The rules every method follows are in gateway/queue/interface.py; the contract suite
(tests/contract/) checks them against your class. In short:

- The constructor stores settings and does no I/O. ``connect`` opens, ``disconnect`` closes;
  both may be called again after a failure.
- Translate every exception of your client library at this boundary into gateway.errors:
  unreachable / timeout / auth expired -> UplinkUnavailable; this one message refused
  (too large, invalid) -> MessageRejected; "try this message again later" (throttled) ->
  RetryableError; an operation your backend cannot do -> NotSupportedError. The
  forwarder decides retry vs dead letter by these classes alone.
- Never pretend: an acknowledgement that does nothing, or a depth of 0 you did not measure,
  loses messages silently. Raise NotSupportedError instead, and say so in your docs.

As shipped, every method of this template raises NotSupportedError, so an unfinished copy
fails loudly instead of dropping messages. A complete, small example that passes the
contract suite: examples/openhqm-file-uplink/.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gateway.errors import NotSupportedError
from gateway.masking import mask_address
from gateway.message import Body, QueueMessage
from gateway.queue.interface import Handler, MessageQueueInterface, PublishResult

BACKEND = "my_custom_queue"


class CustomQueueTemplate(MessageQueueInterface):
    #: shown in errors, logs and metrics (without it: the class name)
    backend_name = BACKEND

    def __init__(self, connection_string: str, option1: str = "default") -> None:
        """Every keyword of ``custom_config`` (or every flat key, for an entry point) lands
        here. Validate values and raise ValueError for bad ones (the gateway reports it as a
        ConfigError); open nothing yet."""
        self.connection_string = connection_string
        self.option1 = option1

    @property
    def target(self) -> str:
        """Where this uplink connects, for the log lines that say it could not: host:port,
        or a URL / connection string with its secrets masked."""
        return mask_address(self.connection_string)

    async def connect(self) -> None:
        """Open the connection and make one real round trip, so a wrong address or
        credential fails here (as UplinkUnavailable) and not on the first message. Called
        again by the forwarder after an outage: make it idempotent."""
        raise NotSupportedError(BACKEND, "connect", "the template is not implemented")

    async def disconnect(self) -> None:
        """Close everything; never raise for a connection that is already gone. Messages in
        flight to a consumer become deliverable again (or say why not)."""
        raise NotSupportedError(BACKEND, "disconnect", "the template is not implemented")

    async def publish(self, queue_name: str, message: Body, priority: int = 0,
                      attributes: dict[str, str] | None = None, delay_seconds: float = 0, *,
                      message_id: str | None = None) -> str:
        """Send one message and return its id: ``message_id`` when given (the gateway always
        gives one, the same on every retry; carry it so consumers can deduplicate), else a
        new gateway.message.new_message_id(). ``message`` goes through
        gateway.message.encode_body; send the exact bytes. Carry ``attributes`` (mqtt_topic,
        openhqm_message_id, ...). Return only after the backend confirmed the message.
        ``priority``/``delay_seconds`` you cannot honour: raise NotSupportedError."""
        raise NotSupportedError(BACKEND, "publish", "the template is not implemented")

    async def publish_batch(self, queue_name: str,
                            messages: Sequence[QueueMessage]) -> list[PublishResult]:
        """The forwarder's only call. Return one PublishResult per message, in input order;
        ``PublishResult(id)`` = accepted, ``PublishResult(id, error)`` = not. Partial failure
        is normal: a refused message fails alone (MessageRejected). If the backend becomes
        unreachable part-way, the rest get UplinkUnavailable and nothing more is tried.
        The inherited default loops over ``publish``; override it with a real batch call
        (pipelining, many in flight) for throughput. Order within a batch must be kept."""
        return await super().publish_batch(queue_name, messages)

    async def consume(self, queue_name: str, handler: Handler, batch_size: int = 10,
                      wait_time_seconds: float = 1.0) -> None:
        """Run until cancelled: fetch up to ``batch_size`` messages, waiting up to
        ``wait_time_seconds``, and await ``handler(QueueMessage)`` for each. A handled message
        stays in flight until acknowledge/reject; a handler that raises has its message
        rejected with requeue. Survive outages (back off, resume). The gateway itself only
        publishes; consume serves tools and the contract suite."""
        raise NotSupportedError(BACKEND, "consume", "the template is not implemented")

    async def acknowledge(self, message_id: str) -> bool:
        """Remove an in-flight message for good. False when this client holds no such
        message in flight (unknown, already settled, or published but never consumed)."""
        raise NotSupportedError(BACKEND, "acknowledge", "the template is not implemented")

    async def reject(self, message_id: str, requeue: bool = True, reason: str = "") -> bool:
        """requeue=True: deliver it again later with retry_count + 1. requeue=False: move it
        to your dead-letter destination together with ``reason``. False when not in flight."""
        raise NotSupportedError(BACKEND, "reject", "the template is not implemented")

    async def get_queue_depth(self, queue_name: str) -> int:
        """The real backlog: messages not yet acknowledged, in flight included; 0 for a queue
        that does not exist. If your backend cannot tell, raise NotSupportedError."""
        raise NotSupportedError(BACKEND, "get_queue_depth", "the template is not implemented")

    async def health_check(self) -> bool:
        """True only after a real round trip succeeded just now; False (never raise) when
        not connected or the backend does not answer."""
        return False

    async def create_queue(self, queue_name: str, **kwargs: Any) -> bool:
        """Create the destination; True if it did not exist. Unknown ``kwargs``: raise
        NotSupportedError naming them."""
        raise NotSupportedError(BACKEND, "create_queue", "the template is not implemented")

    async def delete_queue(self, queue_name: str) -> bool:
        """Delete the destination and its messages; True if it existed."""
        raise NotSupportedError(BACKEND, "delete_queue", "the template is not implemented")

    async def purge_queue(self, queue_name: str) -> int:
        """Remove every waiting message and return how many; the depth is 0 afterwards."""
        raise NotSupportedError(BACKEND, "purge_queue", "the template is not implemented")
