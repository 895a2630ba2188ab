"""The eventhubs uplink backend."""
