"""The README and the docs link to each other's sections and to result files; a heading
renamed or a section moved must not leave a link that leads nowhere."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = ["README.md", "bench/RESULTS.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: lower case, punctuation dropped (hyphens and
    underscores kept), spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    found: set[str] = set()
    for heading in re.findall(r"^#+ (.+)$", FENCE.sub("", page.read_text(encoding="utf-8")), re.M):
        anchor = base = github_anchor(heading)
        suffix = 0
        while anchor in found:  # GitHub numbers repeated headings: x, x-1, x-2
            suffix += 1
            anchor = f"{base}-{suffix}"
        found.add(anchor)
    return found


def test_github_anchor_matches_github():
    assert github_anchor("rk.DEQ: fixed point, Anderson, Broyden; unrolled, implicit, phantom") == \
        "rkdeq-fixed-point-anderson-broyden-unrolled-implicit-phantom"
    assert github_anchor("Supervising the iterates (`state_loss`)") == "supervising-the-iterates-state_loss"
    assert github_anchor('What "exact" means here: measured drift') == "what-exact-means-here-measured-drift"


@pytest.mark.parametrize("name", PAGES)
def test_every_relative_link_resolves(name):
    page = REPO / name
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no file {linked.relative_to(REPO) if linked.is_relative_to(REPO) else linked}")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: {linked.relative_to(REPO)} has no heading with id #{anchor}")
    assert not broken, f"{name}: {len(broken)} broken link(s):\n  " + "\n  ".join(broken)
