"""An append-only, segmented write-ahead log: every hit is written here before it is answered.

Layout: ``<dir>/<base offset, 20 digits>.seg`` files of frames, and a ``cursor`` file holding the
logical offset up to which everything has been delivered (20 digits and their crc32, rewritten in
place: a torn write reads as no cursor, which sends everything again rather than skipping a hit).
A frame is ``<u32 length><u32 crc32>`` then the payload ``<u8 stream><u16 key length><key><data>``.
Offsets are logical (segment base + position), so deleting delivered segments never renumbers
anything.

The segment being written is preallocated (``posix_fallocate``, so a full disk is an error at
rotation, not a SIGBUS mid-write) and memory-mapped: an append is a copy into the page cache, which
survives ``kill -9`` like a write() does, without a system call per hit. The sender writes the next
segment's zeros ahead of time (``next.ready``, see ``prepare_next``): a first write into reserved
but never-written blocks waits in the page fault for the file system. A system call releases the
GIL, and with granian's I/O threads and the sender waiting for it, that hand-off cost more than the
write itself (docs/collector.md). Zero bytes after the last frame are that preallocation: a header
of zeros marks the end of the data; closed segments are truncated to their frames.

One writer (the request loop, plus the sender re-appending what the stream refused) and one reader
(the sender). After a crash, a torn or corrupt tail of the newest segment is cut off on open: those
bytes were never acknowledged complete. Damaged bytes between valid frames are passed over
(``next_frame``), so damage loses only the frames it touches. Delivery is at-least-once: records
after the persisted cursor are sent again.
"""
from __future__ import annotations

import errno
import logging
import mmap
import os
import re
import struct
import threading
import time
import zlib
from pathlib import Path
from typing import NamedTuple

log = logging.getLogger(__name__)

HEADER = struct.Struct("<II")
PREFIX = struct.Struct("<BH")
MAX_FRAME = 4 * 1024 * 1024
RAW, BAD = 0, 1                    # which stream an entry is for
READY = "next.ready"               # the next segment, its zeros written ahead (Spool.prepare_next)


def _cursor_record(offset: int) -> bytes:
    digits = b"%020d" % offset
    return b"%s %08x\n" % (digits, zlib.crc32(digits))


def read_cursor(folder: Path) -> int | None:
    """The delivered offset persisted in ``folder``, or None when there is none or it is torn. One
    without a checksum (written whole by an earlier version, which renamed it into place) is taken
    as it is: a torn fixed-width write of ours keeps its space, so it cannot look like one."""
    try:
        digits, _, check = (folder / "cursor").read_bytes().strip().partition(b" ")
    except FileNotFoundError:
        return None
    if not digits.isdigit() or (check and check != b"%08x" % zlib.crc32(digits)):
        return None
    return int(digits)


class SpoolFull(Exception):
    """The undelivered backlog reached its limit; the caller answers 503."""


class Entry(NamedTuple):          # a tuple: the sender decodes tens of thousands a second
    stream: int
    key: str
    data: bytes


_entry = tuple.__new__            # Entry(...) without its __new__ in Python: a fifth of decode_frames' time


def encode(stream: int, key: str, data: bytes) -> bytes:
    key_bytes = key.encode()
    head = PREFIX.pack(stream, len(key_bytes)) + key_bytes
    # The payload is head + data; its crc32 taken in two parts, so the data is copied once, not twice.
    return HEADER.pack(len(head) + len(data), zlib.crc32(data, zlib.crc32(head))) + head + data


def decode_frames(buffer: bytes, limit: int = 1 << 62) -> tuple[list[Entry], int, bool]:
    """Up to ``limit`` valid frames at the start of ``buffer``; bytes used; whether a bad frame stopped us."""
    entries, position, size = [], 0, len(buffer)
    while position + HEADER.size <= size and len(entries) < limit:
        length, crc = HEADER.unpack_from(buffer, position)
        if length == 0 and crc == 0:                    # the preallocated rest of the active segment
            break
        start, end = position + HEADER.size, position + HEADER.size + length
        if length < PREFIX.size or length > MAX_FRAME:
            return entries, position, True
        if end > size:
            break
        payload = buffer[start:end]
        if zlib.crc32(payload) != crc:
            return entries, position, True
        stream, key_length = PREFIX.unpack_from(payload)
        key_end = PREFIX.size + key_length
        entries.append(_entry(Entry, (stream, payload[PREFIX.size:key_end].decode(), payload[key_end:])))
        position = end
    return entries, position, False


_NON_ZERO = re.compile(rb"[^\0]")


def next_frame(buffer: bytes, start: int) -> int | None:
    """The position of the first whole, valid frame at or after ``start``, or None. Only a resync past
    damaged bytes looks: a frame's length is at most MAX_FRAME, so the top byte of it is a zero, and
    the crc then decides. (A hit cannot forge a frame: a record's data is JSON, which has no NUL.)"""
    position = start
    while (top := buffer.find(b"\0", position + 3, len(buffer) - HEADER.size + 4)) >= 0:
        candidate = top - 3
        if buffer[candidate:top] == b"\0\0\0":
            # In a run of zeros: a frame's length is not 0, so one of its first three bytes is not
            # zero either (a regex finds the next such byte without a Python step per zero).
            non_zero = _NON_ZERO.search(buffer, top)
            if non_zero is None:
                return None
            position = max(candidate + 1, non_zero.start() - 2)
            continue
        length, end = HEADER.unpack_from(buffer, candidate)[0], candidate + HEADER.size
        plausible = PREFIX.size <= length <= MAX_FRAME and end + length <= len(buffer) and buffer[end] in (RAW, BAD)
        if plausible and decode_frames(buffer[candidate:end + length], 1)[0]:
            return candidate
        position = candidate + 1
    return None


def count_frames(buffer: bytes) -> tuple[int, int]:
    """The valid frames in ``buffer``, passing over damaged stretches between them (a disk error, a
    page a power cut never wrote): (frames, the end of the last one). Zeros after the last frame are
    a segment's unwritten rest, not damage."""
    frames, end = 0, 0
    while True:
        found, used, _ = decode_frames(buffer[end:] if end else buffer)
        frames, end = frames + len(found), end + used
        if end == len(buffer) or not buffer[end:].strip(b"\0"):
            return frames, end
        later = next_frame(buffer, end + 1)
        if later is None:
            return frames, end
        end = later


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _preallocate(fd: int, size: int) -> None:
    if hasattr(os, "posix_fallocate"):
        os.posix_fallocate(fd, 0, size)          # blocks reserved: a full disk fails here, not mid-copy
    else:
        os.ftruncate(fd, size)                   # macOS has no posix_fallocate: sparse, no reservation


class Spool:
    def __init__(self, directory: Path, *, max_bytes: int, segment_bytes: int = 64 * 1024 * 1024,
                 fsync: str = "interval", max_age_s: float = 60.0):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.max_age_s = max_age_s
        self.fsync_always = fsync == "always"
        self._lock = threading.Lock()
        self._sync_lock = threading.Lock()
        self.corrupt_frames = 0
        self.closed = False
        self._ready = (self.dir / READY).exists()
        self.cursor, self.records = self._recover()
        self.synced = self.end
        self._unsynced = (0, 0)             # offsets after the first, up to the second: an fsync failed
        # Only commit deletes segments and rotation only adds later ones: while this is the active
        # base, no older segment exists and neither reading nor committing needs to list the folder.
        self._oldest = (self._segments() or [self.active_base])[0]
        # Rewritten in place after every batch: a temporary file renamed over it cost the sender
        # four system calls, and with them the GIL, per batch; at 500 hits a batch that took a fifth
        # of the collector's throughput (docs/collector.md).
        try:
            self._cursor_fd = os.open(self.dir / "cursor", os.O_RDWR | os.O_CREAT, 0o600)
            self._write_cursor(self.cursor)
            os.ftruncate(self._cursor_fd, len(_cursor_record(0)))
        except OSError as exc:
            raise OSError(exc.errno, f"cannot write the spool's cursor {self.dir / 'cursor'}: {exc.strerror}") from exc
        self._reader: tuple[int, object] | None = None

    # ------------------------------------------------------------------ recovery

    def _segments(self) -> list[int]:
        return sorted(int(p.stem) for p in self.dir.glob("*.seg") if p.stem.isdigit())

    def _path(self, base: int) -> Path:
        return self.dir / f"{base:020d}.seg"

    def _recover(self) -> tuple[int, int]:
        """Cut a torn tail, drop delivered segments, count the backlog; returns (cursor, records)."""
        bases = self._segments() or [0]
        cursor = read_cursor(self.dir)
        if cursor is None or cursor < bases[0]:
            cursor = bases[0]
        records = 0
        for index, base in enumerate(bases):
            path = self._path(base)
            data = path.read_bytes() if path.exists() else b""
            last = index == len(bases) - 1
            if not last and base + len(data) <= cursor:
                path.unlink()
                continue
            start = max(0, cursor - base)
            # Damaged bytes between frames stay: the sender passes over them, and says so, when it gets there.
            frames, used = count_frames(data[start:]) if start <= len(data) else (0, 0)
            records += frames
            unused = data[start + used:]
            padding = not unused.strip(b"\0")                 # preallocated, never written
            if unused and (last or padding):
                # A torn tail was never acknowledged; zeros must go too: a reader takes a closed
                # segment's size for its end.
                if not padding:
                    log.warning("spool %s: cutting %d torn/corrupt bytes at the end", path.name, len(unused))
                with open(path, "r+b") as handle:
                    handle.truncate(start + used)
                data = data[:start + used]
            elif unused:
                log.error("spool %s: %d corrupt bytes skipped", path.name, len(unused))
            self.corrupt_frames += int(last and not padding or start > len(data))     # the sender counts the rest
            if last:
                self.end = base + len(data)
                self._open_last(base, len(data))
        return min(cursor, self.end), records

    def _open_last(self, base: int, used: int) -> None:
        """Reopen the newest segment for appends. On a full disk the spool opens all the same, as after
        a failed rotation: the backlog it holds is delivered, and appends fail (503) until a segment
        can be reserved. Refusing to start would keep that backlog from the stream too."""
        try:
            if used == 0 and not self._path(base).exists():
                self.prepare_next()             # a new spool: its first segment written ahead too
            self._map_segment(base, used)
        except OSError as exc:
            log.error("spool %s: no room for new hits (%s); delivering what it holds, refusing hits until a "
                      "%d-byte segment can be reserved", self.dir, exc, self.segment_bytes)
            self.fd, self._map, self.active_base, self.active_since = -1, None, base, time.monotonic()

    # ------------------------------------------------------------------ writing

    @property
    def depth_bytes(self) -> int:
        return self.end - self.cursor

    def append(self, frames: bytes, count: int, *, force: bool = False) -> int:
        """Write encoded frames; returns the end offset they reach. Raises SpoolFull unless forced."""
        with self._lock:
            if self.closed:
                raise OSError(errno.EBADF, "the spool is closed")
            if not force and self.depth_bytes + len(frames) > self.max_bytes:
                raise SpoolFull(f"spool holds {self.depth_bytes} undelivered bytes")
            position = self.end - self.active_base
            if self.fd < 0 or position + len(frames) > len(self._map):    # full, or a failed rotation
                self._rotate(len(frames))
                position = 0
            # In the page cache before we answer, so a killed process never loses them; only
            # fsync protects them from a power cut.
            self._map[position:position + len(frames)] = frames
            self.end += len(frames)
            self.records += count
            return self.end

    def _map_segment(self, base: int, used: int, room: int = 0) -> None:
        """Open segment ``base`` (``used`` bytes written so far) for appending, with ``room`` more at least."""
        fd, mapped = self._open_segment(base, used, room)
        self.fd, self._map, self.active_base, self.active_since = fd, mapped, base, time.monotonic()

    def _open_segment(self, base: int, used: int, room: int) -> tuple[int, mmap.mmap]:
        path = self._path(base)
        existed = path.exists()
        size = max(self.segment_bytes, used + room)
        # fallocate would turn the prepared zeros back into reserved, unwritten blocks.
        prepared = not existed and used == 0 and self._take_ready(path, size)
        fd, mapped = os.open(path, os.O_RDWR | os.O_CREAT, 0o600), None     # raw hits: IPs, cookies
        try:
            if not prepared:
                _preallocate(fd, size)
            mapped = mmap.mmap(fd, size)
            if self.fsync_always and not existed:
                # The new name must be on disk before a hit in it is answered, the first segment's too.
                _fsync_dir(self.dir)
            return fd, mapped
        except OSError:
            if mapped is not None:
                mapped.close()
            os.close(fd)
            if not existed:
                # A segment file in the middle of the active one's offsets would mislead readers.
                path.unlink(missing_ok=True)
            raise

    def _close_segment(self) -> None:
        """Unmap the active segment, cut its preallocated tail and make it durable. Whatever fails,
        the segment counts as closed: the next append starts a new one instead of writing to the
        closed map. Once its fsync is through, every append so far is durable."""
        self._map.close()
        fd, self.fd = self.fd, -1
        try:
            os.ftruncate(fd, self.end - self.active_base)
            os.fsync(fd)
            self.synced = self.end
        except OSError:
            self._fsync_failed(self.synced, self.end)
            raise
        finally:
            os.close(fd)

    def _rotate(self, room: int) -> None:
        """Start a segment at the current end. The new one is opened, its blocks reserved, before the
        active one is closed: on a full disk the active one stays and keeps whatever room it has."""
        if self.fd >= 0 and self.end == self.active_base:
            self._close_segment()           # empty (a frame bigger than it): the new one takes its name
        fd, mapped = self._open_segment(self.end, 0, room)
        try:
            if self.fd >= 0:
                self._close_segment()
        finally:
            self.fd, self._map, self.active_base, self.active_since = fd, mapped, self.end, time.monotonic()

    def _take_ready(self, path: Path, size: int) -> bool:
        """Rename the prepared segment to ``path`` when there is one of ``size`` bytes, all of them
        held on disk (after a crash its zeros may be a hole: fallocate then, or a full disk would
        be a SIGBUS mid-copy)."""
        if not self._ready:
            return False
        self._ready = False
        ready = self.dir / READY
        try:
            found = ready.stat()
            if found.st_size == size and found.st_blocks * 512 >= size:
                os.replace(ready, path)
                return True
            ready.unlink()                      # spool_segment_bytes changed, or a crash left a hole
        except FileNotFoundError:
            pass
        return False

    def prepare_next(self, stop=lambda: False) -> bool:
        """Write the next segment's zeros now, so no hit waits for it; True when one was written.

        A page fault into blocks that ``posix_fallocate`` reserved but nothing wrote (or into a
        sparse file) allocates them in the file system, with the GIL held: on this machine's disk
        that stalled every request for tens of milliseconds (wrk p99 51-64 ms; 8-9 ms into written
        zeros; docs/collector.md). Writing is a copy into the page cache (no fsync: a hole after a
        crash still reads as zeros), and a full disk fails here as it did in fallocate. For the
        sender, between batches; costs nothing while one is ready, and gives up once ``stop()``.
        """
        if self._ready or self.closed:
            return False
        partial = self.dir / (READY + ".tmp")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        written = False
        try:
            zeros = bytes(min(self.segment_bytes, 1 << 20))
            for offset in range(0, self.segment_bytes, len(zeros)):
                if stop():
                    return False
                os.pwrite(fd, zeros[:self.segment_bytes - offset], offset)
            written = True
        finally:
            os.close(fd)
            if not written:
                partial.unlink(missing_ok=True)
        os.replace(partial, self.dir / READY)
        self._ready = True
        return True

    def rotate_if_old(self) -> bool:
        """Start a new segment once the active one is ``max_age_s`` old and holds frames. Raw hits
        (IPs, cookies) then leave the disk within about that long of their delivery, which
        ``commit`` deletes them after, instead of staying until later hits fill the segment (64 MiB
        can take days on a quiet shop). Only once delivery has reached the active segment: during an
        outage nothing older can be deleted, and a new file a minute would only slow reading down.
        For the sender, the spool's only reader."""
        with self._lock:
            if self.closed or self.fd < 0 or self.end == self.active_base or self.cursor < self.active_base \
                    or time.monotonic() - self.active_since < self.max_age_s:
                return False
            self._rotate(0)
            active = self.active_base
        self._delete_delivered(self.cursor, active)     # the old segment now, if it is all delivered
        return True

    def sync_to(self, offset: int) -> None:
        """fsync until ``offset`` is durable. Concurrent callers share one fsync (group commit)."""
        with self._sync_lock:
            if self.is_synced(offset):
                return
            with self._lock:
                fd, base, target = self.fd, self.active_base, self.end
            try:
                os.fsync(fd)
            except (OSError, ValueError) as exc:    # ValueError: fd -1, a failed rotation or close()
                with self._lock:
                    failed = (self.fd, self.active_base) == (fd, base) and fd >= 0
                    fd, target = self.fd, self.end
                    if failed:
                        # A failed write-back (EIO): Linux marks the pages clean all the same, so an
                        # fsync again would pass without the bytes on disk.
                        self._fsync_failed(self.synced, target)
                if failed:
                    raise
                # The segment rotated (and was fsynced) under us; fsync the new one.
                if fd < 0:
                    if self.is_synced(offset):      # close() made it durable meanwhile
                        return
                    raise OSError(errno.EBADF, "the spool's segment is closed") from exc
                os.fsync(fd)
            with self._lock:                        # rotation's close moves it too
                self.synced = max(self.synced, target)
            self.is_synced(offset)                  # raises when a failed fsync covered it

    def is_synced(self, offset: int) -> bool:
        """Whether the spool is durable up to ``offset``; OSError when an fsync that covered it failed."""
        if self._unsynced[0] < offset <= self._unsynced[1]:
            raise OSError(errno.EIO, "an fsync of the spool failed: this hit may not be on disk")
        return self.synced >= offset

    def _fsync_failed(self, start: int, end: int) -> None:
        """Hits from ``start`` to ``end`` may not be on disk, whatever later fsyncs say: they are
        answered 503, not 200 (their client sends them again; those on disk are delivered too).
        Called with ``_lock`` held, as rotation is."""
        low, high = self._unsynced
        self._unsynced = (start, end) if high <= low else (min(low, start), max(high, end))

    # ------------------------------------------------------------------ reading (sender only)

    def read(self, max_records: int, max_bytes: int) -> tuple[list[Entry], int]:
        """Entries from the cursor on, and the offset after them (give it to ``commit``)."""
        with self._lock:
            active, end = self.active_base, self.end
        offset, entries, size = self.cursor, [], 0
        while len(entries) < max_records and size < max_bytes and offset < end:
            base = active if offset >= active else self._segment_of(offset)
            if base is None:
                # Its segment was deleted from outside (a cleanup, a hand): those hits are gone. Waiting
                # for it, the sender sought before the next segment's start at every round, for ever.
                self.corrupt_frames += 1
                skip_to = min(self._next_base(offset), end)
                log.error("spool segment holding bytes %d-%d is gone (deleted from outside the collector); "
                          "going on from the next one", offset, skip_to)
                offset = skip_to
                self._recount(offset, len(entries))
                continue
            segment_end = end if base == active else base + self._path(base).stat().st_size
            if offset >= segment_end:
                offset = self._next_base(base)
                continue
            handle = self._open_reader(base)
            handle.seek(offset - base)
            chunk = handle.read(min(segment_end - offset, max(max_bytes - size, MAX_FRAME + HEADER.size)))
            found, used, bad = decode_frames(chunk, max_records - len(entries))
            entries.extend(found)
            size += used
            offset += used
            if not found:
                # A chunk holds any whole frame and both ends of one are frame boundaries, so no frame
                # at its start is damage (a disk error, zeros a power cut left): waiting for it would
                # stop delivery for good.
                offset = self._pass_damage(base, offset, segment_end, active, bad)
                self._recount(offset, len(entries))
        return entries, offset

    def _pass_damage(self, base: int, offset: int, segment_end: int, active: int, bad: bool) -> int:
        """The offset of the first valid frame after damaged bytes at ``offset``, in this segment or
        else the next one: only the damaged frames are lost, not the rest of the segment."""
        self.corrupt_frames += 1
        handle = self._open_reader(base)
        handle.seek(offset - base)
        later = next_frame(handle.read(segment_end - offset), 1)
        if later is not None:
            resume = offset + later
        else:
            resume = segment_end if base == active else self._next_base(base)
        log.error("spool segment %d: %s at byte %d; %d bytes passed over, delivering on from there", base,
                  "corrupt frame" if bad else "no whole frame (cut short or zeroed)", offset - base, resume - offset)
        return resume

    def _recount(self, offset: int, read: int) -> None:
        """After skipping lost frames, count those still waiting: ``read`` in hand (the commit takes
        them off) and the valid frames from ``offset`` on. The lost ones were counted as waiting for
        ever, so a spool drained to its end still looked a batch behind (the drained gauge stopped)."""
        with self._lock:
            waiting = 0
            for base in self._segments():
                data = self._path(base).read_bytes() if self._path(base).exists() else b""
                if base + len(data) > offset:
                    waiting += count_frames(data[max(0, offset - base):])[0]
            self.records = read + waiting

    def _segment_of(self, offset: int) -> int | None:
        """The closed segment holding ``offset``; None when it is gone."""
        bases = [b for b in self._segments() if b <= offset]
        return bases[-1] if bases else None

    def _next_base(self, base: int) -> int:
        later = [b for b in self._segments() if b > base]
        return later[0] if later else self.end

    def _open_reader(self, base: int):
        if self._reader and self._reader[0] == base:
            return self._reader[1]
        if self._reader:
            self._reader[1].close()
        # Unbuffered: a buffer would keep the preallocated zeros past the end that later appends fill.
        self._reader = (base, open(self._path(base), "rb", buffering=0))  # noqa: SIM115 - kept open across reads
        return self._reader[1]

    def commit(self, offset: int, count: int) -> None:
        """Everything before ``offset`` is delivered: persist the cursor, delete finished segments."""
        self.cursor = offset
        with self._lock:
            self.records -= count
            active = self.active_base
        try:
            self._write_cursor(offset)
        finally:
            # Delivered hits leave the disk even when the cursor cannot be written (a failing disk):
            # a restart clamps the cursor to the oldest segment left, so nothing is skipped.
            if self._oldest < active:
                self._delete_delivered(offset, active)

    def _write_cursor(self, offset: int) -> None:
        os.pwrite(self._cursor_fd, _cursor_record(offset), 0)

    def _delete_delivered(self, offset: int, active: int) -> None:
        bases = self._segments()        # listed once: a long backlog has thousands of segments
        kept = []
        for base, next_base in zip(bases, [*bases[1:], self.end]):
            if base < active and next_base <= offset:
                if self._reader and self._reader[0] == base:
                    self._reader[1].close()
                    self._reader = None
                self._path(base).unlink(missing_ok=True)
            else:
                kept.append(base)
        self._oldest = kept[0] if kept else active

    def close(self) -> None:
        with self._lock:
            self.closed = True
            if self.fd >= 0:
                self._close_segment()           # hits awaiting an fsync are durable after its own
        if self._reader:
            self._reader[1].close()
            self._reader = None
        if self._cursor_fd >= 0:
            os.close(self._cursor_fd)
            self._cursor_fd = -1


_unlockable: set[Path] = set()           # orphan slots said to be unusable once, not every adoption round


def _lock(folder: Path) -> int | None:
    """An exclusive flock on ``folder/lock`` (its fd), or None when a live process holds it."""
    import fcntl

    fd = os.open(folder / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError:
        os.close(fd)
        raise
    return fd


class SpoolDirUnusable(RuntimeError):
    """``spool_dir`` cannot hold this worker's spool: the collector cannot start."""


# Named both ways: it is set in a config file or, in every image, by its environment variable.
SPOOL_DIR_SETTING = "spool_dir (CLICKSTREAM_SPOOL_DIR)"


def claim_dir(root: Path) -> tuple[Path, int]:
    """The first ``worker-N`` folder under ``root`` no other live process holds (flock), and its lock fd.

    Each granian worker gets its own log; after a restart the same slots are claimed again, so a
    killed worker's backlog is picked up by its successor. A slot this process cannot use (a file
    in its place, another user's lock) is passed over with an ERROR: one bad slot stopped every
    collector from starting.
    """
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SpoolDirUnusable(f"{SPOOL_DIR_SETTING} {root} cannot be created: {exc.strerror or exc}") from None
    unusable = []
    for index in range(1024):
        folder = root / f"worker-{index}"
        try:
            folder.mkdir(exist_ok=True)
            fd = _lock(folder)
        except OSError as exc:
            log.error("spool slot %s cannot be used, passed over: %s", folder, exc)
            unusable.append(folder.name)
            if len(unusable) == 8:          # a root-wide problem (read-only, permissions), not one slot
                raise SpoolDirUnusable(f"{SPOOL_DIR_SETTING} {root}: no slot can be used ({exc.strerror or exc})") from None
            continue
        if fd is not None:
            return folder, fd
    raise SpoolDirUnusable(f"no free spool slot under {SPOOL_DIR_SETTING} {root}")


def orphans(root: Path, taken: set[Path]) -> list[tuple[Path, int]]:
    """Slots other than ``taken`` that no live process holds and that still have undelivered frames
    (a stopped task's, or after running with fewer workers than before), locked for us to drain."""
    found = []
    for folder in sorted(root.glob("worker-*")):
        if folder in taken or not folder.is_dir():
            continue
        try:
            fd = _lock(folder)
        except OSError as exc:          # not ours to read (another user's): another process's to drain
            if folder not in _unlockable:
                log.error("spool slot %s cannot be locked, so its backlog is not adopted here: %s", folder, exc)
                _unlockable.add(folder)
            continue
        if fd is None:
            continue
        if _has_backlog(folder):
            found.append((folder, fd))
        else:
            forget_delivered(folder)
            os.close(fd)
    return found


def forget_delivered(folder: Path) -> None:
    """Delete a slot's segments once all of them are delivered: raw hits stay on disk no longer than
    needed, also in a slot no process writes to any more. Its lock must be held."""
    # The cursor first: a crash between the two leaves segments without a cursor, which are sent
    # again (at-least-once); the other order would leave a cursor past data written later.
    (folder / "cursor").unlink(missing_ok=True)
    for path in [*folder.glob("*.seg"), folder / READY, folder / (READY + ".tmp")]:
        path.unlink(missing_ok=True)


def _has_backlog(folder: Path) -> bool:
    ends = [int(p.stem) + p.stat().st_size for p in folder.glob("*.seg") if p.stem.isdigit()]
    return bool(ends) and max(ends) > (read_cursor(folder) or 0)
