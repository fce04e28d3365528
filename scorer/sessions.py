"""Live session states: the shared fold per session, bounded in time, count and memory.

Each session remembers which shard it lives on and the sequence number *before* its first record
("start_after"). Per shard, sessions are kept in creation order, so the earliest sequence number
still needed to rebuild every live session is simply the first entry: that is the "state starts
at" value the worker checkpoints, and where a new owner of the shard starts replaying.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from itertools import islice

from common.features import SessionState
from scorer import metrics

# How far ahead of this machine's clock an event may move its shard's watermarks. One event stamped in
# the future (a collector whose clock ran ahead) would otherwise end every session on the shard idle
# for the timeout before that time; kept well below the 30-minute session timeout.
MAX_AHEAD_MS = 5 * 60_000
# How long a session is kept after its last record arrived, beyond its timeout, before the sweep
# frees it. Whether an event continues a session is decided when it arrives, by its own time
# (session_for); one delayed on its way (a retry, an offline queue) arrives later, compared with its
# session's previous one, than it happened: without the grace a sweep falling between the two
# records would cut a session that a replay batched otherwise keeps whole.
SWEEP_GRACE_MS = 5 * 60_000


class Session:
    __slots__ = ("arrived_ms", "first_arrived_ms", "last_decision", "seen", "session_id", "shard_id", "since_emit",
                 "start_after", "state")

    def __init__(self, session_id: str, shard_id: str, start_after: str | None, first_arrived_ms: int = -1):
        self.arrived_ms = -1                  # collector time of its latest record: what the sweep goes by
        self.first_arrived_ms = first_arrived_ms    # collector time of its first: how far back a replay reaches
        self.session_id = session_id
        self.shard_id = shard_id
        self.start_after = start_after
        self.state = SessionState(session_id)
        self.seen: dict[str, None] = {}       # an ordered set of recent event ids
        self.last_decision: str | None = None
        self.since_emit = 0

    def first_sight(self, event_id: str, window: int) -> bool:
        """True the first time an event id is seen; remembers the last ``window`` ids."""
        if event_id in self.seen:
            return False
        self.seen[event_id] = None
        if len(self.seen) > window:
            del self.seen[next(iter(self.seen))]
        return True


class SessionStore:
    def __init__(self, timeout_ms: int, max_sessions: int, dedupe_window: int, replay_max_ms: int = 7_200_000,
                 clock=time.time):
        self.clock = clock
        self.timeout_ms = timeout_ms
        self.replay_max_ms = replay_max_ms
        self.max_sessions = max_sessions
        self.dedupe_window = dedupe_window
        self.sessions: OrderedDict[str, Session] = OrderedDict()   # least recently seen first
        self.by_shard: dict[str, OrderedDict[str, str | None]] = {}  # creation order: where replays start
        # Per shard, least recently seen first: expiry walks each shard against its own watermark, so a
        # quiet shard's live sessions cannot hold up the expiry (and the replay start) of the others.
        self.recent: dict[str, OrderedDict[str, None]] = {}
        self.watermark_ms: dict[str, int] = {}    # per shard, the latest event time: replay starts go by it
        # Per shard, the latest collector time: sweeps go by it, not by event time. Records reach a
        # shard in about the order they were collected, but not of event time: a backfill sent
        # through the collector crosses hours of event time in a second, and an event-time sweep
        # cut sessions whose next record came a few milliseconds behind another session's.
        self.arrival_ms: dict[str, int] = {}
        # Shards read to their end (a reshard): no event moves their watermark again, so their
        # sessions expire by the slowest watermark of the shards still read (their children's among
        # them): a session may go on on any child, and the slowest has read least far.
        self.finished: set[str] = set()
        # Shards some of whose sessions were dropped while they may have gone on elsewhere (the LRU
        # cap; a finished shard's expiry by other shards' time): a child's new owner rebuilds them.
        self.incomplete: set[str] = set()

    def __len__(self) -> int:
        return len(self.sessions)

    def get(self, session_id: str) -> Session | None:
        return self.sessions.get(session_id)

    def session_for(self, session_id: str, shard_id: str, event_ms: int, arrived_ms: int,
                    start_after: str | None) -> Session:
        """The live session for an event that happened at ``event_ms`` and was collected at
        ``arrived_ms``, starting a new one when absent or inactive too long.

        Expiry is checked here, by event time, so replaying the same records always rebuilds the
        same states however the records were batched.
        """
        ahead_ms = int(self.clock() * 1000) + MAX_AHEAD_MS
        at_ms, arrived_ms = min(event_ms, ahead_ms), min(arrived_ms, ahead_ms)
        self.watermark_ms[shard_id] = max(self.watermark_ms.get(shard_id, at_ms), at_ms)
        self.arrival_ms[shard_id] = max(self.arrival_ms.get(shard_id, arrived_ms), arrived_ms)
        session = self.sessions.get(session_id)
        seen = None
        if session is not None and session.state.seen_ms >= 0 and event_ms - session.state.seen_ms > self.timeout_ms:
            self._remove(session, "timeout")
            session, seen = None, session.seen
        if session is None:
            session = Session(session_id, shard_id, start_after, arrived_ms)
            if seen:
                # The next session under this id keeps the ended one's recent ids: a late copy of one of
                # its events was folded into the new session (training keeps each event id once).
                session.seen = seen
            self.sessions[session_id] = session
            self.by_shard.setdefault(shard_id, OrderedDict())[session_id] = start_after
            self.recent.setdefault(shard_id, OrderedDict())[session_id] = None
            if len(self.sessions) > self.max_sessions:
                self._remove(next(iter(self.sessions.values())), "lru")
        else:
            self.sessions.move_to_end(session_id)
            if session.shard_id != shard_id:      # after a reshard the session continues on a child
                self.by_shard.get(session.shard_id, {}).pop(session_id, None)
                self.recent.get(session.shard_id, {}).pop(session_id, None)
                session.shard_id, session.start_after = shard_id, start_after
                self.by_shard.setdefault(shard_id, OrderedDict())[session_id] = start_after
                self.recent.setdefault(shard_id, OrderedDict())[session_id] = None
            else:
                self.recent[shard_id].move_to_end(session_id)
        session.arrived_ms = max(session.arrived_ms, arrived_ms)
        return session

    def _remove(self, session: Session, reason: str) -> None:
        self.sessions.pop(session.session_id, None)
        self.by_shard.get(session.shard_id, {}).pop(session.session_id, None)
        self.recent.get(session.shard_id, {}).pop(session.session_id, None)
        if reason == "lru" or session.shard_id in self.finished:
            self.incomplete.add(session.shard_id)
        metrics.EVICTIONS.labels(reason).inc()

    def sweep(self, limit: int = 10_000) -> int:
        """Drop sessions none of whose records arrived for longer than the timeout and SWEEP_GRACE_MS
        (by their shard's latest collector time).

        Walks each shard from its least recently seen end and stops at its first live session, so it
        costs little.
        """
        expired = []
        slowest = min((ms for shard, ms in self.arrival_ms.items() if shard not in self.finished), default=None)
        for shard_id, order in self.recent.items():
            watermark = slowest if shard_id in self.finished else self.arrival_ms.get(shard_id)
            for session_id in islice(order, limit):
                session = self.sessions[session_id]
                if watermark is None or watermark - session.arrived_ms <= self.timeout_ms + SWEEP_GRACE_MS:
                    break
                expired.append(session)
        for session in expired:
            self._remove(session, "timeout")
        for shard_id in [shard for shard in self.finished if not self.recent.get(shard)]:
            self._forget(shard_id)
        metrics.SESSIONS_LIVE.set(len(self.sessions))
        return len(expired)

    def finish_shard(self, shard_id: str) -> None:
        """The shard was read to its end: expire its sessions by the other shards' time from now on."""
        self.finished.add(shard_id)

    def holds_all_sessions_of(self, shard_id: str) -> bool:
        """Whether the shard was read to its end here and none of its sessions that may still go on
        was dropped since: its children's sessions need no rebuilding from it."""
        return shard_id in self.finished and shard_id not in self.incomplete

    def _forget(self, shard_id: str) -> None:
        self.recent.pop(shard_id, None)
        self.by_shard.pop(shard_id, None)
        self.watermark_ms.pop(shard_id, None)
        self.arrival_ms.pop(shard_id, None)
        self.finished.discard(shard_id)
        self.incomplete.discard(shard_id)

    def state_after(self, shard_id: str, default: str | None) -> str | None:
        """The sequence number to replay from to rebuild every live session of the shard whose first
        record was collected less than ``replay_max_ms`` before the shard's latest. An older one (a
        kiosk, a server-side tracker with a fixed session id: one that never idles) would pin every
        restart's replay hours back, up to the stream's retention; a restart rebuilds it from there
        only. By collection, not event time: a session from an offline queue or a backfill happened
        days ago but its records are recent, and replaying them is cheap."""
        order = self.by_shard.get(shard_id)
        if not order:
            return default
        oldest_ms = self.arrival_ms.get(shard_id, 0) - self.replay_max_ms
        for session_id, start_after in order.items():
            if self.sessions[session_id].first_arrived_ms >= oldest_ms:
                return start_after
        return default

    def drop_shard(self, shard_id: str) -> None:
        """Forget a shard's sessions (its lease went to another worker, which rebuilds them)."""
        for session_id in self.by_shard.get(shard_id, {}):
            if self.sessions.pop(session_id, None) is not None:
                metrics.EVICTIONS.labels("shard_lost").inc()
        self._forget(shard_id)
        metrics.SESSIONS_LIVE.set(len(self.sessions))
