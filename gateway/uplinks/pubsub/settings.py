"""Settings of ``type: gcp_pubsub`` (keys as in the seed)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PubSubSettings:
    gcp_project_id: str = ""
    gcp_credentials_path: str | None = None
    gcp_max_messages: int = 10
