"""The edge spool's append and replay rates (SQLite WAL on this machine's disk).

Run: python benchmarks/spool_throughput.py [--messages 20000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from edge.spool import Spool


def throughput(n: int = 20_000, batch: int = 100) -> None:
    """Print append rates: single appends, batches, single appends while full, replay."""
    topic = "wattmesh/v1/site/home/telemetry"
    payload = b'{"schema_version":1,"id":"0123456789abcdef","ts":1782043200.0,' + b"x" * 240 + b"}"
    with tempfile.TemporaryDirectory() as tmp:
        with Spool(Path(tmp) / "single.db", max_messages=10 * n) as spool:
            start = time.perf_counter()
            for i in range(n):
                spool.append(topic, payload, 1_782_043_200.0 + i)
            elapsed = time.perf_counter() - start
            print(f"single append:          {n / elapsed:>10,.0f} appends/s")
            start = time.perf_counter()
            replayed = 0
            while batch_out := spool.peek(batch):
                replayed += spool.ack(batch_out[-1].seq)
            elapsed = time.perf_counter() - start
            print(f"replay peek({batch})+ack:   {replayed / elapsed:>10,.0f} messages/s")
        with Spool(Path(tmp) / "batch.db", max_messages=10 * n) as spool:
            items = [(topic, payload, 1_782_043_200.0 + i) for i in range(batch)]
            start = time.perf_counter()
            for _ in range(n // batch):
                spool.append_many(items)
            elapsed = time.perf_counter() - start
            print(f"append_many({batch}):       {n / elapsed:>10,.0f} appends/s")
        with Spool(Path(tmp) / "full.db", max_messages=n // 4) as spool:
            for i in range(n // 4):
                spool.append(topic, payload, 1_782_043_200.0 + i)
            start = time.perf_counter()
            for i in range(n):
                spool.append(topic, payload, 1_782_043_200.0 + i)
            elapsed = time.perf_counter() - start
            print(f"single append, full:    {n / elapsed:>10,.0f} appends/s (drops oldest)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=20_000)
    throughput(parser.parse_args().messages)
