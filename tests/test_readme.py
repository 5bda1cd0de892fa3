"""The documentation stays inside the repository and points at files that exist."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ARCHITECTURE = ROOT / "docs" / "architecture.md"

#: Ways a file could point outside the repository: a sibling checkout, the machine the project
#: was built on, or the notes on its design that live next to it. Built from pieces so that this file
#: does not match itself.
OUTSIDE = [
    re.compile(re.escape(".." + "/shared")),
    re.compile(r"(?<![\w.])/" + "work/"),
    re.compile(r"\bdesign" + r"\.md\b"),
    re.compile(r"\bdesign " + r"(notes|section)\b", re.IGNORECASE),
    re.compile(r"\bthe design" + r"'s\b", re.IGNORECASE),
]


def tracked_text_files() -> list[Path]:
    """Every file git tracks here (every file under the root outside a checkout), if text."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
        ).stdout
        names = [n for n in out.decode().split("\0") if n]
    except (OSError, subprocess.CalledProcessError):
        names = [
            str(p.relative_to(ROOT))
            for p in ROOT.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(ROOT).parts)
        ]
    files = []
    for name in names:
        path = ROOT / name
        if not path.is_file():
            continue
        try:
            path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        files.append(path)
    return files


def test_no_tracked_file_refers_to_anything_outside_the_repository() -> None:
    files = tracked_text_files()
    assert ROOT / "README.md" in files
    offenders = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in files
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if any(p.search(line) for p in OUTSIDE)
    ]
    assert offenders == []


def test_the_outside_patterns_catch_what_they_are_for() -> None:
    samples = [
        "see .." + "/shared/" + "design" + ".md section 2",
        "in the project's design" + " notes",
        "(design" + " section 4)",
        "cat /" + "work/shared/pitfalls.md",
    ]
    for sample in samples:
        assert any(p.search(sample) for p in OUTSIDE), sample
    assert not any(p.search("see docs/architecture.md section 3") for p in OUTSIDE)


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_architecture_document_exists_and_covers_the_issue_topics() -> None:
    text = ARCHITECTURE.read_text()
    headings = [line.lstrip("#").strip() for line in text.splitlines() if line.startswith("## ")]
    for topic in ("data flow", "packages", "topics", "units", "precedence", "market", "trust"):
        assert any(topic in h.lower() for h in headings), topic
    assert "```mermaid" in text
    assert "coordinator/{feeder}/status" in text
    assert "CoordinatorStatus" in text


def test_every_module_the_architecture_document_names_exists() -> None:
    text = ARCHITECTURE.read_text()
    named = set(re.findall(r"`([\w/]+\.(?:py|toml))`", text))
    assert len(named) > 20
    packages = ("broker", "coordinator", "drivers", "edge", "simulators", "wattmesh")
    missing = sorted(
        n
        for n in named
        if not (ROOT / n).is_file()
        and not ("/" not in n and any((ROOT / p / n).is_file() for p in packages))
    )
    assert missing == []


def test_every_message_model_appears_in_the_topic_table() -> None:
    from broker.messages import BY_KIND

    text = ARCHITECTURE.read_text()
    for kind, model in BY_KIND.items():
        assert f"`{model.__name__}`" in text, kind


@pytest.mark.parametrize("source", ["README.md", "docs/architecture.md"])
def test_relative_links_in_the_docs_resolve(source: str) -> None:
    path = ROOT / source
    anchors = {
        _slug(line.lstrip("#"))
        for line in ARCHITECTURE.read_text().splitlines()
        if line.startswith("#")
    }
    for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        assert resolved.is_file(), target
        if anchor and resolved == ARCHITECTURE:
            assert anchor in anchors, target
