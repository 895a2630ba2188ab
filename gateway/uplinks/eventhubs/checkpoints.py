"""Checkpoints and the local dead-letter file, both in the gateway's state directory.

Event Hubs keeps no consumer positions itself: a consumer records, per partition, the
sequence number of the last event it finished (its checkpoint) and resumes after it.
Without a blob store the gateway keeps them in one JSON file per (namespace, hub, consumer
group): ``<state_dir>/eventhubs/checkpoints/<namespace>/<hub>/<group>.json``, shaped
``{"<partition id>": {"sequence_number": N, "offset": "..."}}``. Every update is written to
a temporary file, fsynced, renamed over the old one and the directory fsynced, so a crash
leaves either the old or the new checkpoints, never a torn file.

Acknowledgements arrive out of order. A partition's checkpoint only moves up to the event
before its lowest event still in flight (``PartitionOffsets``, shared with the Kafka
uplink), so no unacknowledged event is ever skipped by a restart.

Events that reject(requeue=False) dead-letters without a DLQ hub are appended, one JSON
object a line, to ``<state_dir>/eventhubs/dead-letters.jsonl`` (fsynced).
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import orjson

from gateway.errors import PermanentError, RetryableError
from gateway.queue.offsets import PartitionOffsets

BACKEND = "azure_eventhubs"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def safe_name(text: str) -> str:
    """A file name for a namespace, hub or group: '$Default' -> '_24Default'."""
    return _UNSAFE.sub(lambda m: f"_{ord(m.group(0)):02X}", text) or "_"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True, slots=True)
class Checkpoint:
    sequence_number: int
    offset: str = ""


@dataclass
class CheckpointFile:
    path: Path
    checkpoints: dict[str, Checkpoint] = field(default_factory=dict)

    @classmethod
    def for_hub(cls, state_dir: str, namespace: str, hub: str, group: str) -> CheckpointFile:
        path = (Path(state_dir) / "eventhubs" / "checkpoints" / safe_name(namespace)
                / safe_name(hub) / f"{safe_name(group)}.json")
        return cls(path)

    def load(self) -> dict[str, Checkpoint]:
        """Read the file (none yet = no checkpoints). A damaged file is a PermanentError: starting
        from the beginning silently would redeliver the whole retention."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            self.checkpoints = {}
            return {}
        except OSError as exc:
            raise RetryableError(f"cannot read the checkpoint file {self.path}: {exc}",
                                 backend=BACKEND) from exc
        try:
            data = orjson.loads(raw)
            self.checkpoints = {str(pid): Checkpoint(int(cp["sequence_number"]), str(cp.get("offset", "")))
                                for pid, cp in data.items()}
        except (orjson.JSONDecodeError, TypeError, KeyError, ValueError, AttributeError) as exc:
            raise PermanentError(f"the checkpoint file {self.path} is damaged ({exc}); move it "
                                 "away to start from the beginning of the retention",
                                 backend=BACKEND) from exc
        return dict(self.checkpoints)

    def save(self, partition_id: str, checkpoint: Checkpoint) -> None:
        """Record one partition's checkpoint durably (blocking: call it in a thread)."""
        updated = dict(self.checkpoints)
        updated[partition_id] = checkpoint
        data = {pid: {"sequence_number": cp.sequence_number, "offset": cp.offset}
                for pid, cp in sorted(updated.items())}
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as fh:
                fh.write(orjson.dumps(data, option=orjson.OPT_INDENT_2))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
            _fsync_dir(self.path.parent)
        except OSError as exc:
            raise RetryableError(f"cannot write the checkpoint file {self.path}: {exc}",
                                 backend=BACKEND) from exc
        self.checkpoints = updated


class Checkpoints(Protocol):
    """Where one hub's checkpoints of one consumer group live (file or blob store)."""

    @property
    def checkpoints(self) -> dict[str, Checkpoint]: ...

    async def load(self) -> dict[str, Checkpoint]: ...

    async def save(self, partition_id: str, checkpoint: Checkpoint) -> None: ...


class FileCheckpoints:
    """CheckpointFile for the event loop: its blocking I/O runs in a thread."""

    def __init__(self, file: CheckpointFile) -> None:
        self.file = file

    @property
    def checkpoints(self) -> dict[str, Checkpoint]:
        return self.file.checkpoints

    async def load(self) -> dict[str, Checkpoint]:
        return await asyncio.to_thread(self.file.load)

    async def save(self, partition_id: str, checkpoint: Checkpoint) -> None:
        await asyncio.to_thread(self.file.save, partition_id, checkpoint)


@dataclass
class PartitionState:
    """One partition as this client sees it: what was handed out, settled, checkpointed."""

    offsets: PartitionOffsets = field(default_factory=PartitionOffsets)
    #: offset string of every event handed out and not yet checkpointed past
    offset_of: dict[int, str] = field(default_factory=dict)

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint | None) -> PartitionState:
        state = cls()
        if checkpoint is not None:
            state.offsets.committed = state.offsets.next_offset = checkpoint.sequence_number + 1
        return state

    def start(self) -> int | None:
        """The first sequence number to read next, or None = the start of the partition."""
        position = max(self.offsets.next_offset, self.offsets.committed)
        return position if position >= 0 else None

    def delivered(self, sequence_number: int, offset: str) -> None:
        if self.offsets.committed < 0 and self.offsets.next_offset < 0:
            # the first event ever read here: nothing before it is owed (it may not be 0
            # when the retention dropped older events)
            self.offsets.committed = sequence_number
        self.offsets.delivered(sequence_number)
        self.offset_of[sequence_number] = offset

    def settle(self, sequence_number: int) -> None:
        """Mark one event done (acknowledged or moved elsewhere)."""
        self.offsets.settle(sequence_number)

    def pending(self) -> Checkpoint | None:
        """The checkpoint to write now, or None when it would not move forward."""
        position = self.offsets.committable()
        if position is None:
            return None
        last = position - 1
        return Checkpoint(last, self.offset_of.get(last, ""))

    def checkpointed(self, checkpoint: Checkpoint) -> None:
        self.offsets.committed = checkpoint.sequence_number + 1
        for seq in [s for s in self.offset_of if s <= checkpoint.sequence_number]:
            del self.offset_of[seq]


def append_dead_letter(state_dir: str, record: dict[str, Any], body: bytes) -> Path:
    """Append one dead-lettered event to the local file, durably (blocking)."""
    path = Path(state_dir) / "eventhubs" / "dead-letters.jsonl"
    line = dict(record, dead_lettered_at=time.time(),
                body_base64=base64.b64encode(body).decode("ascii"))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab") as fh:
            fh.write(orjson.dumps(line) + b"\n")
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        raise RetryableError(f"cannot write the dead-letter file {path}: {exc}",
                             backend=BACKEND) from exc
    return path


def read_dead_letters(state_dir: str) -> list[dict[str, Any]]:
    path = Path(state_dir) / "eventhubs" / "dead-letters.jsonl"
    try:
        lines = path.read_bytes().splitlines()
    except FileNotFoundError:
        return []
    return [orjson.loads(line) for line in lines if line.strip()]
