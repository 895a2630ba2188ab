"""python -m tests.eventhubs_server --port N --hub name:partitions [--hub ...]"""

from __future__ import annotations

import argparse
import logging
import threading

from tests.eventhubs_server import EventHubsServer


def main() -> None:
    parser = argparse.ArgumentParser(description="AMQP 1.0 Event Hubs stand-in for tests")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--hub", action="append", default=[], metavar="NAME:PARTITIONS")
    parser.add_argument("--max-message-size", type=int, default=1024 * 1024)
    parser.add_argument("--consumer-group", action="append", default=None)
    args = parser.parse_args()
    hubs = {name: int(count) for name, _, count in (h.partition(":") for h in args.hub)}
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    server = EventHubsServer(hubs, port=args.port, max_message_size=args.max_message_size,
                             consumer_groups=tuple(args.consumer_group or ["$Default"]))
    server.start()
    print(server.connection_string(), flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
