"""Uplink backends, one package each. A package's ``settings`` module imports no SDK; its
``uplink`` module imports the SDK (an optional extra) and implements MessageQueueInterface."""
