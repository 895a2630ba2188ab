"""The kafka uplink backend."""
