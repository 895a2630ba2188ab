"""Settings of ``type: custom`` (keys as in the seed)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class CustomSettings:
    custom_module: str = ""
    custom_class: str = ""
    custom_config: dict[str, Any] = field(default_factory=dict)
