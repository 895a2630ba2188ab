"""The sqs uplink backend."""
