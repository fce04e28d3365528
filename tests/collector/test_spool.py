"""The write-ahead spool on its own: framing, recovery after a crash, segments, limits."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collector.spool import BAD, RAW, READY, Spool, SpoolFull, claim_dir, encode, forget_delivered, orphans, read_cursor


def fill(spool: Spool, count: int, start: int = 0, stream: int = RAW) -> None:
    for index in range(start, start + count):
        spool.append(encode(stream, f"key-{index}", f"record-{index}".encode()), 1)


def drain(spool: Spool, batch: int = 7) -> list[bytes]:
    out = []
    while True:
        entries, offset = spool.read(batch, 1 << 20)
        if not entries:
            return out
        out += [e.data for e in entries]
        spool.commit(offset, len(entries))


def test_entries_come_back_in_order_with_stream_and_key(tmp_path):
    spool = Spool(tmp_path, max_bytes=1 << 20)
    fill(spool, 3)
    spool.append(encode(BAD, "k", b"bad"), 1)
    entries, _ = spool.read(10, 1 << 20)
    assert [(e.stream, e.key, e.data) for e in entries] == [
        (RAW, "key-0", b"record-0"), (RAW, "key-1", b"record-1"), (RAW, "key-2", b"record-2"), (BAD, "k", b"bad")]
    assert spool.records == 4


def test_reopen_resumes_after_the_committed_cursor(tmp_path):
    spool = Spool(tmp_path, max_bytes=1 << 20)
    fill(spool, 10)
    entries, offset = spool.read(4, 1 << 20)
    spool.commit(offset, len(entries))
    # No close(): as after kill -9, the file is whatever write() put in the kernel.
    again = Spool(tmp_path, max_bytes=1 << 20)
    assert again.records == 6
    assert drain(again) == [f"record-{i}".encode() for i in range(4, 10)]


def test_a_torn_cursor_sends_everything_again_rather_than_skip_a_hit(tmp_path):
    spool = Spool(tmp_path, max_bytes=1 << 20)
    fill(spool, 10)
    entries, offset = spool.read(4, 1 << 20)
    spool.commit(offset, len(entries))
    record = (tmp_path / "cursor").read_bytes()
    torn = record[:5] + (b"9" if record[5:6] != b"9" else b"8") + record[6:]   # half-written on a power cut
    (tmp_path / "cursor").write_bytes(torn)
    assert read_cursor(tmp_path) is None
    assert drain(Spool(tmp_path, max_bytes=1 << 20)) == [f"record-{i}".encode() for i in range(10)]


def test_a_cursor_written_by_an_earlier_version_is_resumed_from(tmp_path):
    spool = Spool(tmp_path, max_bytes=1 << 20)
    fill(spool, 10)
    _, offset = spool.read(4, 1 << 20)
    (tmp_path / "cursor").write_text(str(offset))         # plain digits, renamed into place
    again = Spool(tmp_path, max_bytes=1 << 20)
    assert again.records == 6
    assert drain(again) == [f"record-{i}".encode() for i in range(4, 10)]
    assert read_cursor(tmp_path) == again.cursor                # and rewritten in the checked form


def test_a_torn_tail_is_cut_and_writing_continues(tmp_path):
    spool = Spool(tmp_path, max_bytes=1 << 20)
    fill(spool, 5)
    segment = next(tmp_path.glob("*.seg"))
    with open(segment, "ab") as handle:
        handle.write(encode(RAW, "torn", b"half written")[:9])
    again = Spool(tmp_path, max_bytes=1 << 20)
    assert again.records == 5
    fill(again, 2, start=5)
    assert drain(again) == [f"record-{i}".encode() for i in range(7)]


def test_a_corrupt_frame_is_not_delivered(tmp_path):
    spool = Spool(tmp_path, max_bytes=1 << 20)
    fill(spool, 3)
    segment = next(tmp_path.glob("*.seg"))
    data = bytearray(segment.read_bytes())
    data[spool.end - 2] ^= 0xFF                          # flip a byte of the last record's data
    segment.write_bytes(bytes(data))
    again = Spool(tmp_path, max_bytes=1 << 20)
    assert drain(again) == [b"record-0", b"record-1"]
    assert again.corrupt_frames == 1


@pytest.mark.parametrize("damage", ["cut short", "zeroed header"])
def test_an_older_segment_cut_short_or_zeroed_is_skipped_not_waited_on_forever(tmp_path, damage):
    """Waiting for the rest of a closed segment's frame stopped delivery for good while new hits were
    still spooled and answered 200."""
    spool = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=200)
    fill(spool, 12)
    spool.close()
    oldest = min(tmp_path.glob("*.seg"))
    data = oldest.read_bytes()
    frame = len(encode(RAW, "key-0", b"record-0"))
    if damage == "cut short":
        oldest.write_bytes(data[:-5])                       # the last frame loses its end
    else:
        oldest.write_bytes(data[:frame] + bytes(8) + data[frame + 8:])   # the second frame's header zeroed
    again = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=200)
    delivered = drain(again)
    assert delivered[0] == b"record-0" and delivered[-1] == b"record-11"    # the later segments come
    assert again.corrupt_frames >= 1 and again.depth_bytes == 0 and again.records == 0


def damage(folder: Path, offset: int, replacement: bytes) -> None:
    """Overwrite the bytes at a logical spool offset, in whichever segment holds them."""
    base = max(b for b in (int(p.stem) for p in folder.glob("*.seg")) if b <= offset)
    with open(folder / f"{base:020d}.seg", "r+b") as handle:
        handle.seek(offset - base)
        handle.write(replacement)


@pytest.mark.parametrize("closed", [True, False], ids=["older segment", "newest segment at restart"])
def test_a_damaged_frame_loses_that_frame_only_not_the_frames_after_it(tmp_path, closed, caplog):
    """A corrupt frame dropped the rest of its segment (up to 64 MiB of hits): an older one was
    skipped to its end, the newest was cut at the damage on restart."""
    import logging

    spool = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=1 << 16)
    ends = [spool.append(encode(RAW, f"key-{i}", f"record-{i}".encode()), 1) for i in range(20)]
    if closed:
        fill(spool, 1, start=20)
        spool._rotate(0)                                   # record-0..20 now in a closed segment
    damage(tmp_path, ends[4] + 10, b"\xff\xfe")           # inside record-5's frame
    with caplog.at_level(logging.ERROR, logger="collector.spool"):
        again = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=1 << 16)
        fill(again, 2, start=30)
        delivered = drain(again)
    kept = [i for i in range(21 if closed else 20) if i != 5] + [30, 31]
    assert delivered == [f"record-{i}".encode() for i in kept]
    assert again.corrupt_frames == 1 and again.records == 0 and again.depth_bytes == 0
    assert "passed over" in caplog.text


def test_zeros_a_power_cut_left_between_frames_are_passed_over(tmp_path):
    """A page written back after a later one: zeros, then frames. Zeros had read as the end."""
    spool = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=1 << 16)
    ends = [spool.append(encode(RAW, f"key-{i}", f"record-{i}".encode()), 1) for i in range(10)]
    damage(tmp_path, ends[2], bytes(ends[5] - ends[2]))    # record-3..5 never reached the disk
    again = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=1 << 16)
    assert again.records == 7
    assert drain(again) == [f"record-{i}".encode() for i in (0, 1, 2, 6, 7, 8, 9)]


@settings(max_examples=80, deadline=None)
@given(count=st.integers(1, 60), delivered_first=st.integers(0, 60), close=st.booleans(),
       where=st.floats(0, 1, exclude_max=True), length=st.integers(1, 300), zeros=st.booleans(),
       seed=st.integers(0, 2**32 - 1))
def test_whatever_stretch_is_damaged_every_intact_frame_is_delivered_once_in_order(
        tmp_path_factory, count, delivered_first, close, where, length, zeros, seed):
    import random

    folder = tmp_path_factory.mktemp("spool")
    spool = Spool(folder, max_bytes=1 << 30, segment_bytes=512)
    data = [f"{i}:".encode() + b"x" * (i % 7 * 13) for i in range(count)]
    frames = [encode(RAW, f"k{i}", d) for i, d in enumerate(data)]
    ends = [spool.append(frame, 1) for frame in frames]
    starts = [end - len(frame) for end, frame in zip(ends, frames)]
    entries, offset = spool.read(delivered_first, 1 << 20) if delivered_first else ([], spool.cursor)
    spool.commit(offset, len(entries))
    if close:
        spool.close()
    first = len(entries)
    if first == count:
        return
    # A stretch of random bytes or zeros somewhere in the undelivered frames, within one segment file.
    at = starts[first] + int(where * (spool.end - starts[first]))
    segment = max(p for p in folder.glob("*.seg") if int(p.stem) <= at)
    room = min(spool.end, int(segment.stem) + segment.stat().st_size) - at
    stretch = (bytes(length) if zeros else random.Random(seed).randbytes(length))[:room]
    damage(folder, at, stretch)
    hit = {i for i in range(first, count) if starts[i] < at + len(stretch) and ends[i] > at
           and frames[i][max(0, at - starts[i]):at + len(stretch) - starts[i]]
           != stretch[max(0, starts[i] - at):ends[i] - at]}
    again = Spool(folder, max_bytes=1 << 30, segment_bytes=512)
    assert drain(again) == [data[i] for i in range(first, count) if i not in hit]
    assert again.records == 0


def test_a_segment_deleted_from_outside_while_running_is_passed_over_not_waited_on_forever(tmp_path, caplog):
    """The sender sought before the next segment's start (EINVAL) at every round: hits spooled
    after the deletion were answered 200 and never delivered until a restart."""
    import logging

    spool = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=200)
    fill(spool, 3)
    first = min(tmp_path.glob("*.seg"))
    first.unlink()                                          # a cleanup script, a hand
    fill(spool, 9, start=3)                                 # on to a later segment
    assert min(int(path.stem) for path in tmp_path.glob("*.seg")) > 0
    with caplog.at_level(logging.ERROR, logger="collector.spool"):
        delivered = drain(spool)
    assert delivered and delivered[-1] == b"record-11" and b"record-0" not in delivered
    assert spool.corrupt_frames == 1 and spool.depth_bytes == 0
    assert spool.records == 0                               # the lost ones are not counted as waiting
    assert "is gone (deleted from outside the collector)" in caplog.text


def test_segments_rotate_and_delivered_ones_are_deleted(tmp_path):
    spool = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=200)
    fill(spool, 40)
    assert len(list(tmp_path.glob("*.seg"))) > 3
    assert drain(spool, batch=5) == [f"record-{i}".encode() for i in range(40)]
    assert len(list(tmp_path.glob("*.seg"))) == 1
    assert spool.depth_bytes == 0 and spool.records == 0



def on_disk(folder: Path) -> bytes:
    return b"".join(path.read_bytes() for path in folder.glob("*.seg"))


def test_delivered_hits_leave_the_disk_once_their_segment_is_old(tmp_path):
    """Raw hits hold IPs and cookies: they must not wait on disk for 64 MiB of later hits."""
    spool = Spool(tmp_path, max_bytes=1 << 20, max_age_s=3600)
    fill(spool, 5)
    assert drain(spool) == [f"record-{i}".encode() for i in range(5)]
    assert not spool.rotate_if_old() and b"record-0" in on_disk(tmp_path)     # young: kept for now
    spool.max_age_s = 0
    assert spool.rotate_if_old()
    assert b"record-" not in on_disk(tmp_path)
    assert not spool.rotate_if_old()                  # the new segment is empty: nothing to rotate
    fill(spool, 3, start=5)
    spool.close()
    assert drain(Spool(tmp_path, max_bytes=1 << 20)) == [f"record-{i}".encode() for i in range(5, 8)]


def test_an_old_segment_with_a_backlog_is_deleted_only_once_delivered(tmp_path):
    spool = Spool(tmp_path, max_bytes=1 << 20, max_age_s=0)
    fill(spool, 4)
    assert spool.rotate_if_old()
    fill(spool, 2, start=4)
    assert b"record-0" in on_disk(tmp_path) and len(list(tmp_path.glob("*.seg"))) == 2
    assert drain(spool) == [f"record-{i}".encode() for i in range(6)]
    assert len(list(tmp_path.glob("*.seg"))) == 1 and b"record-0" not in on_disk(tmp_path)


def test_an_outage_does_not_turn_every_minute_into_a_segment_file(tmp_path):
    """Nothing older can be deleted while the stream is down: rotating by age would only add files,
    each one more for the sender to walk (a quiet shop: 1,440 a day)."""
    spool = Spool(tmp_path, max_bytes=1 << 20, max_age_s=0)
    fill(spool, 1)
    assert spool.rotate_if_old()                      # the cursor was in the active segment
    for minute in range(30):                           # the stream is down: nothing is delivered
        fill(spool, 1, start=1 + minute)
        spool.rotate_if_old()
    assert len(list(tmp_path.glob("*.seg"))) == 2
    assert drain(spool) == [f"record-{i}".encode() for i in range(31)]


def test_segments_are_readable_by_their_owner_only(tmp_path):
    spool = Spool(tmp_path, max_bytes=1 << 20, max_age_s=0)
    fill(spool, 1)
    spool.rotate_if_old()
    assert {path.stat().st_mode & 0o777 for path in tmp_path.glob("*.seg")} == {0o600}



def test_a_hit_awaiting_its_fsync_when_the_spool_closes_is_durable_not_an_error(tmp_path):
    """fsync=always: a hit waits for sync_to while shutdown closes the spool, whose own fsync covers it."""
    spool = Spool(tmp_path, max_bytes=1 << 20, fsync="always")
    end = spool.append(encode(RAW, "k", b"late hit"), 1)
    spool.close()
    spool.sync_to(end)                                  # answered 200, not a ValueError on fd -1 (a 500)


def fsync_failing_once(monkeypatch, after: int = 0) -> None:
    """The fsync after the next ``after`` fails as a disk's write-back error does; Linux then marks the
    pages clean, so the fsyncs after it pass."""
    import collector.spool

    real_fsync, calls = os.fsync, []

    def failing_once(fd):
        calls.append(fd)
        if len(calls) <= after:
            return real_fsync(fd)
        monkeypatch.setattr(collector.spool.os, "fsync", real_fsync)
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(collector.spool.os, "fsync", failing_once)


def test_a_hit_whose_fsync_failed_is_never_called_durable(tmp_path, monkeypatch):
    """fsync=always answers 200 only once the hit is on disk: a retried fsync on the same file passed
    after EIO, so the hit was answered 200 without being on disk."""
    spool = Spool(tmp_path, max_bytes=1 << 20, fsync="always")
    end = spool.append(encode(RAW, "k", b"hit"), 1)
    fsync_failing_once(monkeypatch)
    for _ in range(2):                                  # asked again, as the next waiting hit does
        with pytest.raises(OSError, match="Input/output error|may not be on disk"):
            spool.sync_to(end)
    later = spool.append(encode(RAW, "k", b"later hit"), 1)
    spool.sync_to(later)                                # written after the failure: durable as usual
    assert spool.is_synced(later)


def test_a_hit_in_a_segment_whose_closing_fsync_failed_is_not_made_durable_by_the_next_segment(tmp_path, monkeypatch):
    spool = Spool(tmp_path, max_bytes=1 << 20, max_age_s=0, fsync="always")
    end = spool.append(encode(RAW, "k", b"hit"), 1)
    fsync_failing_once(monkeypatch, after=1)           # the new segment's folder entry, then the old one
    with pytest.raises(OSError):
        spool.rotate_if_old()
    later = spool.append(encode(RAW, "k", b"later hit"), 1)
    with pytest.raises(OSError, match="may not be on disk"):
        spool.sync_to(end)
    spool.sync_to(later)
    assert spool.is_synced(later)


def test_a_second_failed_fsync_does_not_make_the_first_ones_hits_durable(tmp_path, monkeypatch):
    spool = Spool(tmp_path, max_bytes=1 << 20, fsync="always")
    first = spool.append(encode(RAW, "k", b"first hit"), 1)
    fsync_failing_once(monkeypatch)
    with pytest.raises(OSError):
        spool.sync_to(first)
    between = spool.append(encode(RAW, "k", b"hit between"), 1)
    spool.sync_to(between)                              # durable, but not what the failed fsync covered
    last = spool.append(encode(RAW, "k", b"last hit"), 1)
    fsync_failing_once(monkeypatch)
    with pytest.raises(OSError):
        spool.sync_to(last)
    with pytest.raises(OSError, match="may not be on disk"):
        spool.is_synced(first)


def test_a_restart_after_a_failed_cursor_write_delivers_the_rest(tmp_path, monkeypatch):
    """Delivered segments go even when the cursor cannot be written; the restart then finds a cursor
    before its oldest segment, and must start there, not read from an offset that no longer exists."""
    spool = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=4096)
    for i in range(12):
        spool.append(encode(RAW, "k", b"%04d" % i + b"x" * 996), 1)     # three segments of four
    delivered, offset = spool.read(4, 1 << 20)
    monkeypatch.setattr(spool, "_write_cursor", lambda offset: (_ for _ in ()).throw(OSError(5, "EIO")))
    with pytest.raises(OSError):
        spool.commit(offset, len(delivered))
    spool.close()
    rest = drain(Spool(tmp_path, max_bytes=1 << 20, segment_bytes=4096))
    assert [data[:4] for data in rest] == [b"%04d" % i for i in range(4, 12)]


def test_fsync_always_makes_every_new_segment_name_durable_the_first_one_too(tmp_path, monkeypatch):
    """A first segment named by a rename that never reached the disk came back as the prepared
    ``next.ready`` after a power cut, which recovery ignores and the next segment overwrites."""
    import collector.spool

    synced_dirs = []
    real = collector.spool._fsync_dir
    monkeypatch.setattr(collector.spool, "_fsync_dir", lambda path: synced_dirs.append(path) or real(path))
    spool = Spool(tmp_path, max_bytes=1 << 20, max_age_s=0, fsync="always")
    assert synced_dirs == [tmp_path]
    spool.sync_to(spool.append(encode(RAW, "k", b"hit"), 1))
    assert spool.rotate_if_old() and synced_dirs == [tmp_path, tmp_path]


def test_a_segment_that_fails_to_close_leaves_the_spool_writable(tmp_path, monkeypatch):
    spool = Spool(tmp_path, max_bytes=1 << 20, max_age_s=0)
    fill(spool, 3)
    fsync_failing_once(monkeypatch)
    with pytest.raises(OSError):
        spool.rotate_if_old()
    fill(spool, 2, start=3)                            # a new segment, not a write to the closed map
    assert drain(spool) == [f"record-{i}".encode() for i in range(5)]


def test_a_slot_left_with_everything_delivered_is_emptied(tmp_path):
    """After a scale-in, a slot no process writes to any more keeps no delivered hits."""
    root = tmp_path / "spool"
    folder, fd = claim_dir(root)
    spool = Spool(folder, max_bytes=1 << 20)
    fill(spool, 3)
    drain(spool)
    spool.close()
    os.close(fd)
    assert b"record-0" in on_disk(folder)
    assert orphans(root, set()) == []                  # nothing to adopt: it had no backlog
    assert not list(folder.glob("*.seg")) and not (folder / "cursor").exists()
    again = Spool(folder, max_bytes=1 << 20)           # and the slot starts afresh
    fill(again, 2, start=3)
    assert drain(again) == [b"record-3", b"record-4"]

def test_a_slot_that_cannot_be_used_is_passed_over_not_fatal(tmp_path, caplog):
    """A slot another user's collector left (its lock unreadable here) or a file in a slot's place
    stopped every collector from starting, with a stack trace."""
    import logging

    from collector.spool import SpoolDirUnusable

    root = tmp_path / "spool"
    root.mkdir()
    (root / "worker-0").write_text("not a folder")                 # FileExistsError at mkdir
    (root / "worker-1" / "lock").mkdir(parents=True)                # IsADirectoryError at open: unlockable
    (root / "worker-1" / "0.seg").write_bytes(b"x")
    with caplog.at_level(logging.ERROR, logger="collector.spool"):
        folder, fd = claim_dir(root)
        assert folder == root / "worker-2"
        assert orphans(root, {folder}) == [] and orphans(root, {folder}) == []
    os.close(fd)
    said = [r.getMessage() for r in caplog.records]
    assert said[0].startswith(f"spool slot {root / 'worker-0'} cannot be used, passed over: [Errno 17] File exists")
    assert said[1].startswith(f"spool slot {root / 'worker-1'} cannot be used, passed over: [Errno 21]")
    assert said[2].startswith(f"spool slot {root / 'worker-1'} cannot be locked, so its backlog is not adopted here")
    assert len(said) == 3                                           # once, not every adoption round
    (tmp_path / "a-file").write_text("")
    with pytest.raises(SpoolDirUnusable, match=re.escape(f"spool_dir (CLICKSTREAM_SPOOL_DIR) {tmp_path / 'a-file'} cannot be created: File exists")):
        claim_dir(tmp_path / "a-file")


def test_a_commit_lists_the_spool_folder_once_however_long_the_backlog(tmp_path, monkeypatch):
    # It listed the folder again for every segment: quadratic in a long outage's backlog.
    spool = Spool(tmp_path, max_bytes=1 << 24, segment_bytes=200)
    fill(spool, 600)
    listings = []
    real = Path.glob
    monkeypatch.setattr(Path, "glob", lambda self, pattern: listings.append(pattern) or real(self, pattern))
    entries, offset = spool.read(600, 1 << 24)
    listings.clear()
    spool.commit(offset, len(entries))
    assert len(entries) == 600 and len(listings) == 1
    assert len(list(tmp_path.glob("*.seg"))) == 1


def test_a_batch_read_and_committed_within_the_active_segment_lists_nothing(tmp_path, monkeypatch):
    # The sender's steady state: listing the folder per batch cost the collector throughput.
    spool = Spool(tmp_path, max_bytes=1 << 24, segment_bytes=1 << 16)
    fill(spool, 50)
    listings = []
    real = Path.glob
    monkeypatch.setattr(Path, "glob", lambda self, pattern: listings.append(pattern) or real(self, pattern))
    assert len(drain(spool)) == 50 and not listings
    fill(spool, 3000)                   # rotates: the delivered segments are found and deleted again
    assert len(drain(spool, batch=500)) == 3000 and listings
    assert len(list(tmp_path.glob("*.seg"))) == 1


def test_the_preallocated_tail_of_a_crashed_run_is_cut_quietly(tmp_path, caplog):
    crashed = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=1 << 16)   # never closed: as after kill -9
    fill(crashed, 3)
    segment = next(tmp_path.glob("*.seg"))
    assert segment.stat().st_size == 1 << 16                               # preallocated, zeros after the frames
    again = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=1 << 16)
    assert again.records == 3 and again.corrupt_frames == 0
    assert "torn" not in caplog.text
    fill(again, 2, start=3)
    assert drain(again) == [f"record-{i}".encode() for i in range(5)]
    again.close()
    assert segment.stat().st_size == again.end                              # closed: only the frames are left


def test_a_frame_larger_than_a_segment_gets_a_segment_of_its_own(tmp_path):
    spool = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=64)
    big = b"x" * 1000
    fill(spool, 1)
    spool.append(encode(RAW, "big", big), 1)
    fill(spool, 1, start=1)
    assert drain(spool) == [b"record-0", big, b"record-1"]


def test_a_disk_that_cannot_hold_a_new_segment_refuses_appends_until_it_can(tmp_path, monkeypatch):
    spool = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=100)
    fill(spool, 2)

    def disk_full(fd, offset, length):
        raise OSError(28, "No space left on device")
    acknowledged = [b"record-0", b"record-1"]
    with monkeypatch.context() as patched:
        patched.setattr(os, "posix_fallocate", disk_full)
        for index in range(2, 12):
            try:
                fill(spool, 1, start=index)
            except OSError:
                continue                                # the caller answers 503: not acknowledged
            acknowledged.append(f"record-{index}".encode())
    assert len(acknowledged) < 12                       # the segment filled up and the next one failed
    fill(spool, 1, start=100)
    assert drain(spool) == [*acknowledged, b"record-100"]
    assert spool.records == 0



def test_a_spool_reopened_on_a_full_disk_delivers_its_backlog_and_refuses_hits_until_there_is_room(
        tmp_path, monkeypatch):
    """Reserving the newest segment again failed the start: the backlog stayed on disk, undelivered."""
    spool = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=100)
    fill(spool, 6)
    spool.close()

    def disk_full(fd, offset, length):
        raise OSError(28, "No space left on device")
    with monkeypatch.context() as patched:
        patched.setattr(os, "posix_fallocate", disk_full)
        again = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=100)
        with pytest.raises(OSError):
            fill(again, 1, start=6)                      # answered 503
        assert drain(again) == [f"record-{i}".encode() for i in range(6)]
    fill(again, 1, start=7)                              # room again
    again.close()
    assert drain(Spool(tmp_path, max_bytes=1 << 20, segment_bytes=100)) == [b"record-7"]


def test_a_full_disk_at_an_age_rotation_keeps_the_segment_with_room_in_use(tmp_path, monkeypatch):
    """Rotating by age must not cost hits: while a new segment cannot be reserved, the current one,
    whose blocks are reserved already, goes on taking them."""
    spool = Spool(tmp_path, max_bytes=1 << 20, max_age_s=0)
    fill(spool, 2)
    drain(spool)

    def disk_full(fd, offset, length):
        raise OSError(28, "No space left on device")
    with monkeypatch.context() as patched:
        patched.setattr(os, "posix_fallocate", disk_full)
        with pytest.raises(OSError):
            spool.rotate_if_old()
        fill(spool, 3, start=2)                         # accepted: no 503 for a rotation that can wait
    assert len(list(tmp_path.glob("*.seg"))) == 1       # the failed segment's file is not left behind
    assert spool.rotate_if_old()
    assert drain(spool) == [b"record-2", b"record-3", b"record-4"]

def test_full_spool_refuses_unless_forced(tmp_path):
    frame = encode(RAW, "k", b"x" * 100)
    spool = Spool(tmp_path, max_bytes=len(frame) * 3)
    for _ in range(3):
        spool.append(frame, 1)
    with pytest.raises(SpoolFull):
        spool.append(frame, 1)
    spool.append(frame, 1, force=True)                   # what the stream refused is never dropped
    entries, offset = spool.read(2, 1 << 20)
    spool.commit(offset, len(entries))
    spool.append(frame, 1)                               # room again after delivery
    assert spool.records == 3


def test_sync_to_fsyncs_the_active_segment_once_per_offset(tmp_path, monkeypatch):
    spool = Spool(tmp_path, max_bytes=1 << 20, fsync="always")
    fill(spool, 3)
    real_fsync, synced = os.fsync, []

    def recording_fsync(fd):
        synced.append(os.fstat(fd).st_ino)
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", recording_fsync)
    segment = next(tmp_path.glob("*.seg")).stat().st_ino
    spool.sync_to(spool.end)
    assert synced == [segment]                           # the file the hits were written to
    spool.sync_to(spool.end)
    spool.sync_to(spool.end - 1)
    assert synced == [segment]                           # already durable: no second fsync (group commit)
    fill(spool, 1, start=3)
    spool.sync_to(spool.end)
    assert synced == [segment, segment]
    assert spool.synced == spool.end


def test_each_process_claims_its_own_slot(tmp_path):
    folder, fd = claim_dir(tmp_path)
    # flock is per open file description: a second claim in the same process behaves like another process.
    other, other_fd = claim_dir(tmp_path)
    assert folder.name == "worker-0" and other.name == "worker-1"
    os.close(fd)
    again, again_fd = claim_dir(tmp_path)
    assert again.name == "worker-0"
    os.close(other_fd)
    os.close(again_fd)



STEP = st.one_of(st.tuples(st.just("append"), st.integers(0, 5000)), st.tuples(st.just("deliver"), st.integers(1, 9)),
                 st.tuples(st.just("crash"), st.integers(0, 20)), st.tuples(st.just("age"), st.just(0)))


@settings(max_examples=40, deadline=None)
@given(steps=st.lists(STEP, max_size=40))
def test_whatever_happens_every_acknowledged_entry_is_delivered_in_order(tmp_path_factory, steps):
    folder = tmp_path_factory.mktemp("spool")
    spool = Spool(folder, max_bytes=1 << 30, segment_bytes=4096, max_age_s=0)
    appended, delivered, number = [], [], 0
    for action, value in steps:
        if action == "append":
            data = f"{number}:".encode() + b"x" * value
            spool.append(encode(RAW, "k", data), 1)
            appended.append(data)
            number += 1
        elif action == "deliver":
            entries, offset = spool.read(value, 1 << 20)
            delivered += [e.data for e in entries]
            spool.commit(offset, len(entries))
        elif action == "age":
            spool.rotate_if_old()                 # the sender closes a segment by age
        else:
            # kill -9 mid-write: a torn frame at the end of the newest segment, then a restart.
            newest = max(folder.glob("*.seg"))
            with open(newest, "ab") as handle:
                handle.write(encode(RAW, "torn", b"t" * 50)[:value])
            spool = Spool(folder, max_bytes=1 << 30, segment_bytes=4096, max_age_s=0)
    delivered += drain(spool)
    assert delivered == appended
    assert len(list(folder.glob("*.seg"))) == 1             # every delivered segment deleted


def test_the_next_segment_is_written_ahead_and_taken_at_rotation(tmp_path):
    # A first write into reserved but unwritten blocks stalled requests in the page fault: each
    # segment's zeros are written before any hit goes in, the first at opening, the next by the sender.
    spool = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=4096)
    assert not (tmp_path / READY).exists()              # written and taken as the first segment
    assert not spool.prepare_next(stop=lambda: True)           # a stopping sender does not wait for it
    assert not (tmp_path / READY).exists() and not (tmp_path / (READY + ".tmp")).exists()
    assert spool.prepare_next() and not spool.prepare_next()    # one ahead is enough
    ready = (tmp_path / READY).stat()
    assert ready.st_size == 4096 and (tmp_path / READY).read_bytes() == bytes(4096)
    fill(spool, 200)                                    # past the first segment
    segments = sorted(tmp_path.glob("*.seg"))
    assert len(segments) > 1 and segments[1].stat().st_ino == ready.st_ino
    assert drain(spool) == [f"record-{i}".encode() for i in range(200)]


def test_leftovers_of_writing_ahead_change_nothing_after_a_crash(tmp_path, monkeypatch):
    spool = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=4096)
    fill(spool, 10)
    spool.prepare_next()
    (tmp_path / (READY + ".tmp")).write_bytes(bytes(100))      # killed while writing another
    again = Spool(tmp_path, max_bytes=1 << 20, segment_bytes=8192)   # and restarted with bigger segments
    fill(again, 200, start=10)
    assert drain(again) == [f"record-{i}".encode() for i in range(210)]
    assert all(path.stat().st_size <= 8192 for path in tmp_path.glob("*.seg"))
    again.prepare_next()
    os.truncate(tmp_path / READY, 0)
    os.truncate(tmp_path / READY, 8192)                         # a hole, as an OS crash may leave it
    reserved = []
    monkeypatch.setattr(os, "posix_fallocate", lambda fd, offset, length: reserved.append(length) or
                        os.ftruncate(fd, length))
    fill(again, 200, start=210)
    assert drain(again) == [f"record-{i}".encode() for i in range(210, 410)]
    assert not (tmp_path / READY).exists() and reserved == [8192]   # removed, the segment reserved instead
    again.close()
    forget_delivered(tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == []
