"""The mqtt uplink backend."""
