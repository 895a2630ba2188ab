"""The local SQLite store-and-forward queue. See ``db`` for the schema and invariants."""

from gateway.store.records import AppendOutcome, AppendStatus, NewMessage, Settlement, StoredMessage
from gateway.store.store import Store

__all__ = ["AppendOutcome", "AppendStatus", "NewMessage", "Settlement", "Store", "StoredMessage"]
