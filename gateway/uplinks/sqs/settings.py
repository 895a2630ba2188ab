"""Settings of ``type: sqs`` (keys as in the seed)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SqsSettings:
    sqs_region: str = "us-east-1"
    sqs_queue_url: str = ""
