"""Event Hubs checkpoints: the file in the state directory (atomic, durable, loud when
damaged) and the rule that out-of-order acknowledgements never skip an unsettled event."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gateway.errors import PermanentError
from gateway.uplinks.eventhubs.checkpoints import (
    Checkpoint,
    CheckpointFile,
    PartitionState,
    append_dead_letter,
    read_dead_letters,
    safe_name,
)


def test_the_file_round_trips_and_names_namespace_hub_and_group(tmp_path: Path) -> None:
    file = CheckpointFile.for_hub(str(tmp_path), "127.0.0.1:5672", "hub-a", "$Default")
    assert file.path == (tmp_path / "eventhubs" / "checkpoints" / "127.0.0.1_3A5672" / "hub-a"
                         / "_24Default.json")
    assert file.load() == {}  # no file yet: no checkpoints
    file.save("0", Checkpoint(41, "4100"))
    file.save("1", Checkpoint(7, "700"))
    again = CheckpointFile.for_hub(str(tmp_path), "127.0.0.1:5672", "hub-a", "$Default")
    assert again.load() == {"0": Checkpoint(41, "4100"), "1": Checkpoint(7, "700")}
    assert not list(file.path.parent.glob("*.tmp"))  # written through a renamed temp file


def test_a_save_replaces_the_file_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    file = CheckpointFile.for_hub(str(tmp_path), "ns", "hub", "g")
    file.save("0", Checkpoint(1))
    calls: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    def fsync(fd: int) -> None:
        calls.append("fsync")
        real_fsync(fd)

    def replace(a: str, b: str) -> None:
        calls.append("replace")
        real_replace(a, b)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    file.save("0", Checkpoint(2))
    assert calls == ["fsync", "replace", "fsync"]  # data, rename, directory

    def crash(a: object, b: object) -> None:
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(Exception, match="cannot write the checkpoint file"):
        file.save("0", Checkpoint(3))
    assert CheckpointFile(file.path).load() == {"0": Checkpoint(2)}  # the old one is intact
    assert file.checkpoints == {"0": Checkpoint(2)}


def test_a_damaged_file_is_an_error_not_a_silent_restart(tmp_path: Path) -> None:
    file = CheckpointFile.for_hub(str(tmp_path), "ns", "hub", "g")
    file.path.parent.mkdir(parents=True)
    file.path.write_text('{"0": {"sequence_nu')
    with pytest.raises(PermanentError, match="damaged"):
        file.load()


def test_out_of_order_acks_move_the_checkpoint_only_over_a_contiguous_prefix() -> None:
    state = PartitionState.from_checkpoint(None)
    assert state.start() is None  # nothing read yet: the start of the partition
    for seq in range(5):
        state.delivered(seq, f"o{seq}")
    state.settle(1)
    state.settle(3)
    assert state.pending() is None  # 0 is still in flight
    state.settle(0)
    checkpoint = state.pending()
    assert checkpoint == Checkpoint(1, "o1")  # 0 and 1 done; 2 still in flight
    state.checkpointed(checkpoint)
    assert state.pending() is None
    state.settle(2)
    assert state.pending() == Checkpoint(3, "o3")  # 4 is in flight
    state.checkpointed(Checkpoint(3, "o3"))
    state.settle(4)
    assert state.pending() == Checkpoint(4, "o4")
    assert state.start() == 5


def test_a_checkpoint_restores_the_start_position() -> None:
    state = PartitionState.from_checkpoint(Checkpoint(9, "900"))
    assert state.start() == 10
    assert state.offsets.committed == 10
    assert state.pending() is None
    state.delivered(10, "1000")
    assert state.start() == 11  # handed out events are not read again by this client
    state.settle(10)
    assert state.pending() == Checkpoint(10, "1000")


def test_safe_names_do_not_collide_or_escape() -> None:
    assert safe_name("a/b") != safe_name("a_b")
    assert "/" not in safe_name("../../etc")
    assert safe_name("") == "_"


def test_dead_letters_are_appended_durably(tmp_path: Path) -> None:
    append_dead_letter(str(tmp_path), {"message_id": "m1", "reason": "bad"}, b"\x00\xff")
    append_dead_letter(str(tmp_path), {"message_id": "m2", "reason": "worse"}, b"{}")
    records = read_dead_letters(str(tmp_path))
    assert [(r["message_id"], r["reason"], r["body_base64"]) for r in records] == [
        ("m1", "bad", "AP8="), ("m2", "worse", "e30=")]
    assert all(r["dead_lettered_at"] > 0 for r in records)
