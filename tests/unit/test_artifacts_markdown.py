"""The markdown the flows publish as Prefect artifacts shows hostile names as data.

The artifacts are rendered by a markdown parser (markdown-it, which rich already brings, with GFM
tables) and the HTML checked: one table row per host, seven cells in each, the text of each cell
exactly the name as written (escaped where it holds control characters), and no HTML, link,
emphasis or code made from a name. Prefect's artifact functions are replaced by a recorder: this
is about the text, not the server.
"""

from __future__ import annotations

import html
import re
from typing import Any

import pytest
from markdown_it import MarkdownIt

from flows.common import HostOutcome
from hostmaint.display import visible
from hostmaint.models import MigrationResult, StepOutcome
from hostmaint.placement import plan_evacuation
from tests.hostile import HOSTILE_NAMES, hostile_snapshot

NAMES = list(HOSTILE_NAMES.values())
MARKDOWN = MarkdownIt("commonmark").enable("table")


def _cells(page: str) -> list[list[str]]:
    """The text of every table cell, row by row, as a browser would show it."""
    rows = re.findall(r"<tr>(.*?)</tr>", page, re.S)
    return [[html.unescape(c) for c in re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row, re.S)] for row in rows]


def _no_markup_from_names(page: str) -> None:
    tags = set(re.findall(r"</?([a-z0-9]+)", page))
    allowed = {"h1", "h2", "p", "table", "thead", "tbody", "tr", "th", "td", "pre", "code", "blockquote", "strong"}
    assert tags <= allowed, tags


@pytest.fixture
def published(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[Any]]:
    import flows.common

    seen: dict[str, list[Any]] = {"markdown": [], "table": []}
    monkeypatch.setattr(flows.common, "create_markdown_artifact", lambda text, **_: seen["markdown"].append(text))
    monkeypatch.setattr(flows.common, "create_table_artifact", lambda rows, **_: seen["table"].append(rows))
    return seen


def test_the_run_report_keeps_one_row_per_host_and_shows_each_name_as_written(
        published: dict[str, list[Any]]) -> None:
    from flows.common import publish_report

    outcomes = [HostOutcome(host=name, outcome=StepOutcome.FAILED, state="failed", detail=f"dnf said: {name}",
                            migrations=[MigrationResult(vm=name, source="hv01", target="hv02",
                                                        outcome=StepOutcome.OK)])
                for name in NAMES]
    publish_report("patch window `w1` | <b>", outcomes)
    (text,) = published["markdown"]
    page = MARKDOWN.render(text)
    _no_markup_from_names(page)
    header, *rows = _cells(page)
    assert header == ["host", "outcome", "state", "rebooted", "packages", "seconds", "detail"]
    assert len(rows) == len(NAMES)
    for row, name in zip(rows, NAMES, strict=True):
        assert len(row) == 7, row
        # a multi-line detail shows its first line in the cell; the whole text follows the table
        first, _, rest = f"dnf said: {name}".partition("\n")
        assert row[0] == visible(name) and row[6] == visible(first + (" (in full below)" if rest else ""))
    below = [n for n in NAMES if "\n" in n]
    assert below and page.count("<h2>") == len(below)
    assert "<h1>patch window `w1` | &lt;b&gt;</h1>" in page
    (table,) = published["table"]
    assert [r["vm"] for r in table] == [visible(n) for n in NAMES]
    assert all("\n" not in r["vm"] and "\x1b" not in r["vm"] for r in table)


def test_the_plan_shown_for_approval_is_a_code_block_nothing_closes(monkeypatch: pytest.MonkeyPatch) -> None:
    import flows.runbooks.approval as approval

    seen: list[str] = []
    logged: list[tuple[Any, ...]] = []
    monkeypatch.setattr(approval, "create_markdown_artifact", lambda text, **_: seen.append(text))

    class Logger:
        def info(self, *args: Any) -> None:
            logged.append(args)

    monkeypatch.setattr(approval, "get_run_logger", Logger)
    snap = hostile_snapshot()
    names = [v.name for v in snap.vms if v.host == "hv01"]
    # a VM whose name holds a fence: the plan's code block must not end there
    plan = plan_evacuation(snap, ["hv01"])
    why = "# disk failing\n```\n<img src=x onerror=alert(1)> [click](https://evil.example)"
    text = approval.show_plan(plan, "hv01", why)
    (artifact,) = seen
    page = MARKDOWN.render(artifact)
    _no_markup_from_names(page)
    blocks = re.findall(r"<pre><code>(.*?)</code></pre>", page, re.S)
    assert len(blocks) == 1 and html.unescape(blocks[0]).rstrip("\n") == text
    assert all(visible(name) in blocks[0] or visible(name) in html.unescape(blocks[0]) for name in names)
    assert page.count("<h1>") == 1
    assert html.unescape(re.findall(r"<p>(Why: .*?)</p>", page, re.S)[0]) == f"Why: {visible(why)}"
    assert "\n" not in logged[0][2]  # the reason in the log line: one line


def test_a_fence_inside_the_plan_cannot_close_its_block(monkeypatch: pytest.MonkeyPatch) -> None:
    import flows.runbooks.approval as approval

    seen: list[str] = []
    monkeypatch.setattr(approval, "create_markdown_artifact", lambda text, **_: seen.append(text))
    monkeypatch.setattr(approval, "get_run_logger", lambda: type("L", (), {"info": lambda *a: None})())
    snap = hostile_snapshot()
    vms = tuple(v.model_copy(update={"name": "```\n# owned"}) if v.name == NAMES[0] else v for v in snap.vms)
    snap = snap.model_copy(update={"vms": vms})
    host = next(v.host for v in vms if v.name.startswith("```"))
    text = approval.show_plan(plan_evacuation(snap, [host]), host, "check")
    page = MARKDOWN.render(seen[0])
    assert "<h1>" in page and page.count("<h1>") == 1  # only the artifact's own title
    assert html.unescape(re.findall(r"<pre><code>(.*?)</code></pre>", page, re.S)[0]).rstrip("\n") == text
