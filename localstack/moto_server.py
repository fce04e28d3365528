"""moto's server, answering one request at a time: ``python -m localstack.moto_server -H HOST -p PORT``.

moto serves each request in a thread of its own, but its backends are not safe for that: its Kinesis
shard gives two PutRecords that arrive together the same sequence number, and the later record
replaces the earlier (16 threads writing 64,000 records to one shard lost 1,707), and its
conditional writes read and then write in two steps. AWS loses nothing there, so an emulator that
does would make tests of "nothing lost" fail for the emulator's sake, and the demo lose events. One
lock around each request makes every call atomic, as the services are; the backends hold the GIL
for nearly all of their work anyway, so little is lost to it.
"""
from __future__ import annotations

import threading

from moto import server
from moto.moto_server.werkzeug_app import DomainDispatcherApplication

_one_request_at_a_time = threading.Lock()
_dispatch = DomainDispatcherApplication.__call__


def _serialized(self, environ, start_response):
    with _one_request_at_a_time:
        return _dispatch(self, environ, start_response)


DomainDispatcherApplication.__call__ = _serialized

if __name__ == "__main__":
    server.main()
