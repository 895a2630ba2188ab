"""The pubsub uplink backend."""
