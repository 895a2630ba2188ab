"""Downlink: commands and configuration from the cloud to the devices, at least once.

``gateway.downlink.downlink.Downlink`` consumes them at an uplink's backend and publishes
them to the local broker; ``settings`` is its config section. This package's top level stays
light (config imports it): import the daemon part from ``gateway.downlink.downlink``.
"""

from gateway.downlink.settings import DownlinkConfig, parse_downlink

__all__ = ["DownlinkConfig", "parse_downlink"]
