"""Settings of ``type: custom`` (keys as in the seed)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gateway import masking


@dataclass(frozen=True, slots=True)
class CustomSettings:
    custom_module: str = ""
    custom_class: str = ""
    #: the constructor's keyword arguments; shown by ``config check`` with the values of
    #: secret-looking names masked (gateway/masking.py: kind_for_name)
    custom_config: dict[str, Any] = field(default_factory=dict,
                                          metadata={"secret": masking.BY_NAME})
