"""Settings of ``type: redis`` (keys as in the seed, plus stream trimming and consumer naming)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from gateway.settings import DURATION, secret_url


@dataclass(frozen=True, slots=True)
class RedisSettings:
    redis_url: str = secret_url("redis://localhost:6379/0")
    #: approximate MAXLEN for XADD; 0 keeps every entry
    redis_maxlen: int = 0
    #: consumer group used by consume(); created on demand
    redis_consumer_group: str = "openhqm-gateway"
    #: stable consumer name within the group; '' = the gateway id
    redis_consumer_name: str = ""
    #: pending entries idle this long are reclaimed by XAUTOCLAIM
    redis_claim_idle: Annotated[float, DURATION] = 60.0
    redis_socket_timeout: Annotated[float, DURATION] = 10.0
    #: XDEL an entry once it is acknowledged, so the stream holds only the backlog. Turn off
    #: when other consumer groups read the same stream: they would lose entries they have
    #: not read yet (depth stays correct either way; MAXLEN then bounds the history)
    redis_delete_acked: bool = True
