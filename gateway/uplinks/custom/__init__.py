"""The custom uplink backend."""
