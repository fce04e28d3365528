"""A consumer process for the multi-process tests: appends each record it handles to a file
(fsync'd) before checkpointing, and writes the shards it owns to a status file."""
import json
import os
import signal
import sys
import time

from common.config import AwsSettings, load
from common.consumer import consumer_for


def main() -> None:
    out_path, status_path = sys.argv[1], sys.argv[2]
    settings = load(AwsSettings)
    consumer = consumer_for(settings, settings.raw_stream, app="test",
                            lease_ms=int(os.environ.get("LEASE_MS", "3000")), shard_refresh_s=1)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    with open(out_path, "a") as out:
        while not stopping:
            for batch in consumer.poll():
                out.writelines(record.data.decode() + "\n" for record in batch.records)
                out.flush()
                os.fsync(out.fileno())
                consumer.checkpoint(batch)
            with open(status_path + ".tmp", "w") as status:
                json.dump(sorted(consumer.owned), status)
            os.replace(status_path + ".tmp", status_path)
            time.sleep(0.1)
    consumer.close()


if __name__ == "__main__":
    main()
