"""Two feeders on one broker, for the many-feeders tests (tests/test_feeders*.py)."""

from __future__ import annotations

import json

from broker.feeders import FeedersFile, FeederSpec, OperatorListener
from tests.broker_fixtures import free_port

NORTH = ("n-1", "n-2")
SOUTH = ("s-1", "s-2")


def two_feeders(*, tls_ports: bool = False, ingest_workers: int = 0) -> FeedersFile:
    """Feeders north (NORTH's sites) and south (SOUTH's) and the operator's listener, each on
    a free port; with ``tls_ports`` each also has a free TLS port; ``ingest_workers`` ingest
    users for each feeder's coordinator."""
    count = 6 if tls_ports else 3
    ports: set[int] = set()
    while len(ports) < count:
        ports.add(free_port())
    ordered = sorted(ports)
    tls = ordered[1::2] if tls_ports else [None] * 3
    plain = ordered[0::2] if tls_ports else ordered
    return FeedersFile(
        operator=OperatorListener(port=plain[0], tls_port=tls[0]),
        feeders=tuple(
            FeederSpec(
                id=name, port=port, tls_port=tls_port, sites=sites, ingest_workers=ingest_workers
            )
            for name, port, tls_port, sites in zip(
                ("north", "south"), plain[1:], tls[1:], (NORTH, SOUTH), strict=True
            )
        ),
    )


def feeders_toml(spec: FeedersFile) -> str:
    """``spec`` as a feeders file (config/feeders.toml's format), for ``broker init --feeders``."""
    q = json.dumps  # a JSON string is a valid TOML basic string
    lines = ["[operator]", f"port = {spec.operator.port}"]
    if spec.operator.tls_port is not None:
        lines.append(f"tls_port = {spec.operator.tls_port}")
    for f in spec.feeders:
        lines += ["", "[[feeders]]", f"id = {q(f.id)}", f"port = {f.port}"]
        if f.tls_port is not None:
            lines.append(f"tls_port = {f.tls_port}")
        if f.coordinator is not None:
            lines.append(f"coordinator = {q(f.coordinator)}")
        lines.append(f"sites = [{', '.join(q(s) for s in f.sites)}]")
        if f.ingest_workers:
            lines.append(f"ingest_workers = {f.ingest_workers}")
    return "\n".join(lines) + "\n"
