"""``wattmesh ledger backup`` / ``restore`` on real SQLite files, with a writer settling live."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from coordinator.ledger import Ledger

ROOT = Path(__file__).resolve().parent.parent

#: A coordinator stand-in: settles one interval after another until killed.
WRITER = textwrap.dedent("""
    import sys, random
    from pathlib import Path
    from coordinator.ledger import Ledger
    path, ready = Path(sys.argv[1]), Path(sys.argv[2])
    rng = random.Random(3)
    with Ledger(path) as ledger:
        k = 1000
        while True:
            sites = {f"site-{i}": rng.uniform(-3, 3) for i in range(20)}
            ledger.settle_interval(
                k,
                clearing_price_per_kwh=0.2,
                retail_price_per_kwh=0.3,
                feed_in_price_per_kwh=0.08,
                awards_kwh={s: round(v, 2) for s, v in sites.items()},
                metered_kwh={s: v + rng.uniform(-0.5, 0.5) for s, v in sites.items()},
                rebate="traded_energy",
            )
            k += 1
            if k == 1010:
                ready.touch()
""")


def _wattmesh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wattmesh", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


@pytest.fixture
def live_ledger(tmp_path: Path) -> tuple[Path, subprocess.Popen[bytes]]:
    ledger, ready = tmp_path / "ledger.sqlite", tmp_path / "ready"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(ledger), str(ready)], cwd=ROOT)
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert writer.poll() is None, "the writer died"
        assert time.monotonic() < deadline, "the writer never got going"
        time.sleep(0.05)
    yield ledger, writer
    writer.kill()
    writer.wait()


def test_backups_taken_while_intervals_are_settled_restore_to_a_ledger_that_checks(
    live_ledger: tuple[Path, subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    ledger, writer = live_ledger
    counts = []
    for i in range(2):
        backup = tmp_path / f"backup-{i}.sqlite"
        done = _wattmesh("ledger", "backup", str(ledger), str(backup))
        assert done.returncode == 0, done.stderr
        assert "balanced" in done.stdout
        with Ledger(backup, migrate=False) as copy:
            assert copy.check_balanced()
            counts.append(len(copy.settled_intervals()))
    assert writer.poll() is None  # the writer settled on throughout
    assert counts == sorted(counts)
    assert counts[0] >= 10
    restored = tmp_path / "restored.sqlite"
    done = _wattmesh("ledger", "restore", str(tmp_path / "backup-1.sqlite"), str(restored))
    assert done.returncode == 0, done.stderr
    check = _wattmesh("ledger", "check", str(restored))
    assert check.returncode == 0, check.stdout + check.stderr
    with Ledger(restored, migrate=False) as copy:
        assert len(copy.settled_intervals()) == counts[1]


def test_restore_refuses_a_ledger_in_use_and_keeps_the_one_it_replaces(
    live_ledger: tuple[Path, subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    ledger, writer = live_ledger
    backup = tmp_path / "backup.sqlite"
    assert _wattmesh("ledger", "backup", str(ledger), str(backup)).returncode == 0
    refused = _wattmesh("ledger", "restore", str(backup), str(ledger))
    assert refused.returncode == 2
    assert "stop the coordinator before restoring" in refused.stderr
    writer.kill()
    writer.wait()
    with Ledger(ledger, migrate=False) as live:
        before = len(live.settled_intervals())
    done = _wattmesh("ledger", "restore", str(backup), str(ledger))
    assert done.returncode == 0, done.stderr
    kept = list(tmp_path.glob("ledger.sqlite.pre-restore-*"))
    assert len(kept) == 1
    with Ledger(kept[0], migrate=False) as previous, Ledger(ledger, migrate=False) as now:
        assert len(previous.settled_intervals()) == before
        assert len(now.settled_intervals()) <= before
        assert now.check_balanced()


def test_a_backup_never_overwrites_without_force_nor_copies_a_stranger(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.sqlite"
    Ledger(ledger).close()
    backup = tmp_path / "backup.sqlite"
    backup.write_text("precious")
    refused = _wattmesh("ledger", "backup", str(ledger), str(backup))
    assert refused.returncode == 2
    assert "exists (--force replaces it)" in refused.stderr
    assert backup.read_text() == "precious"
    assert _wattmesh("ledger", "backup", str(ledger), str(backup), "--force").returncode == 0
    stranger = tmp_path / "notes.txt"
    stranger.write_text("not a ledger")
    bad = _wattmesh("ledger", "restore", str(stranger), str(tmp_path / "x.sqlite"))
    assert bad.returncode == 2
    assert not (tmp_path / "x.sqlite").exists()
