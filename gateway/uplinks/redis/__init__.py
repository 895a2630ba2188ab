"""The redis uplink backend."""
