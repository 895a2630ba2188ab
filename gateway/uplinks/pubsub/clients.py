"""Building the publisher and subscriber clients: credentials, project, channel, batching.

Runs in a worker thread (``connect`` hands it to the uplink's executor): loading credentials
reads files and Application Default Credentials may ask the metadata server.

- Emulator (``gcp_emulator_host`` or ``$PUBSUB_EMULATOR_HOST``): plaintext and anonymous.
- Otherwise: the key file ``gcp_credentials_path``, else Application Default Credentials.
- The project: ``gcp_project_id``, else the project of the credentials.

The channels reconnect within ``MAX_RECONNECT_BACKOFF_MS`` after the service comes back (gRPC's
default backoff grows to two minutes) and carry messages up to the service's size limit.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import google.auth
import grpc  # type: ignore[import-untyped]  # no stubs; the mypy config covers only google.*
from google.auth import exceptions as auth_exc
from google.cloud import pubsub_v1
from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport
from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

from gateway.errors import ConfigError
from gateway.uplinks.pubsub.settings import PubSubSettings

SCOPES = ["https://www.googleapis.com/auth/pubsub"]
MAX_RECONNECT_BACKOFF_MS = 5000
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
    ("grpc.keepalive_time_ms", 30000),
]


@dataclass(frozen=True, slots=True)
class Clients:
    publisher: Any  # google.cloud.pubsub_v1.PublisherClient
    subscriber: Any  # google.cloud.pubsub_v1.SubscriberClient
    project: str
    emulator: str

    def close(self) -> None:
        """Close both channels. Call after the publisher's outstanding batches finished."""
        for client in (self.publisher, self.subscriber):
            with contextlib.suppress(ValueError, RuntimeError, grpc.RpcError):
                client.transport.close()


def emulator_host(settings: PubSubSettings) -> str:
    return settings.gcp_emulator_host or os.environ.get("PUBSUB_EMULATOR_HOST", "")


def build_clients(settings: PubSubSettings, ordering: bool) -> Clients:
    """Blocking: run it off the event loop."""
    emulator = emulator_host(settings)
    if emulator:
        project = settings.gcp_project_id
        pub_transport = PublisherGrpcTransport(
            channel=grpc.insecure_channel(emulator, options=CHANNEL_OPTIONS))
        sub_transport = SubscriberGrpcTransport(
            channel=grpc.insecure_channel(emulator, options=CHANNEL_OPTIONS))
    else:
        credentials, credentials_project = _credentials(settings)
        project = settings.gcp_project_id or credentials_project or ""
        pub_transport = PublisherGrpcTransport(
            credentials=credentials, channel=_channel_factory(PublisherGrpcTransport))
        sub_transport = SubscriberGrpcTransport(
            credentials=credentials, channel=_channel_factory(SubscriberGrpcTransport))
    if not project:
        raise ConfigError("queue.gcp_project_id", settings.gcp_project_id,
                          "needed: the credentials do not name a project")
    batch = pubsub_v1.types.BatchSettings(
        max_messages=settings.gcp_batch_max_messages, max_bytes=settings.gcp_batch_max_bytes,
        max_latency=settings.gcp_batch_max_latency)
    options = pubsub_v1.types.PublisherOptions(enable_message_ordering=ordering)
    publisher = pubsub_v1.PublisherClient(transport=pub_transport, batch_settings=batch,
                                          publisher_options=options)
    subscriber = pubsub_v1.SubscriberClient(transport=sub_transport)
    return Clients(publisher, subscriber, project, emulator)


def _credentials(settings: PubSubSettings) -> tuple[Any, str | None]:
    path = settings.gcp_credentials_path
    try:
        if path:
            credentials, project = google.auth.load_credentials_from_file(  # type: ignore[no-untyped-call]
                path, scopes=SCOPES)
        else:
            credentials, project = google.auth.default(scopes=SCOPES)
    except auth_exc.DefaultCredentialsError as exc:
        key = "queue.gcp_credentials_path"
        reason = (f"cannot load the credentials: {exc}" if path else
                  f"no Application Default Credentials ({exc}); set {key} or "
                  "GOOGLE_APPLICATION_CREDENTIALS")
        raise ConfigError(key, path, reason) from None
    return credentials, project


def _channel_factory(transport: type[Any]) -> Callable[..., grpc.Channel]:
    """The transport's own channel with our reconnect options added."""
    def create(host: str, **kwargs: Any) -> grpc.Channel:
        options = [*kwargs.pop("options", []), *CHANNEL_OPTIONS[2:]]
        channel: grpc.Channel = transport.create_channel(host, options=options, **kwargs)
        return channel
    return create
