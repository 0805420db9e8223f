"""What a benchmark hands back, and how the harness shows it: aligned text for the terminal, markdown for
BENCHMARKS.md.

BENCHMARKS.md is updated, never rewritten: every benchmark owns the span between ``<!-- bench:NAME -->`` and
``<!-- /bench:NAME -->``, and the harness replaces only the spans of the benchmarks that ran. Text outside the
markers (and sections of benchmarks that did not run) is kept as it is.
"""

from __future__ import annotations

import os
import platform
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

__all__ = [
    "BenchResult",
    "Machine",
    "Table",
    "Target",
    "document_header",
    "markdown_section",
    "markdown_table",
    "text_report",
    "text_table",
    "update_document",
]

_NUMBER = re.compile(r"[-+−]?[\d.,]+\b")
HEADER_START = "<!-- bench-header -->"
HEADER_END = "<!-- /bench-header -->"
DOCUMENT_TITLE = "# Benchmarks"


@dataclass(slots=True)
class Table:
    """Column names and rows of already formatted cells. Columns of numbers are right-aligned, others left."""

    columns: list[str]
    rows: list[list[str]]
    caption: str = ""

    def numeric(self, column: int) -> bool:
        cells = [row[column] for row in self.rows if column < len(row) and row[column]]
        return bool(cells) and all(_NUMBER.match(cell) for cell in cells)

    def problems(self) -> list[str]:
        """Why this table is not fit to print (empty list when it is)."""
        found: list[str] = []
        if not self.columns:
            found.append("the table has no columns")
        if not self.rows:
            found.append("the table has no rows")
        for number, row in enumerate(self.rows, 1):
            if len(row) != len(self.columns):
                found.append(f"row {number} has {len(row)} cells for {len(self.columns)} columns")
        return found


@dataclass(frozen=True, slots=True)
class Target:
    """A goal stated in an issue, checked by the benchmark: printed as a met/MISSED line."""

    statement: str
    met: bool
    detail: str = ""

    def line(self) -> str:
        verdict = "met" if self.met else "MISSED"
        return f"Target {verdict}: {self.statement}" + (f" — {self.detail}" if self.detail else "")


@dataclass(slots=True)
class BenchResult:
    """One benchmark's findings.

    ``description`` says what was measured and under which setup or distribution; ``table`` is the main
    result (the smoke run requires it to have rows); ``targets`` and ``notes`` follow it as bullet lines;
    ``extra_tables`` come last, each with its caption.
    """

    title: str
    description: str
    table: Table
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    extra_tables: list[Table] = field(default_factory=list)

    def problems(self) -> list[str]:
        found = list(self.table.problems())
        for number, extra in enumerate(self.extra_tables, 1):
            found.extend(f"extra table {number}: {problem}" for problem in extra.problems())
        return found


@dataclass(frozen=True, slots=True)
class Machine:
    cores: int | None
    memory_bytes: int | None
    cpu_model: str | None
    python: str
    system: str

    @classmethod
    def current(cls) -> Machine:
        return cls(
            cores=os.cpu_count(),
            memory_bytes=_total_memory(Path("/proc/meminfo")),
            cpu_model=_cpu_model(Path("/proc/cpuinfo")) or platform.processor() or None,
            python=f"{platform.python_implementation()} {platform.python_version()}",
            system=platform.platform(terse=True),
        )

    def describe(self) -> str:
        cores = f"{self.cores} cores" if self.cores else "unknown core count"
        memory = f"{self.memory_bytes / 2**30:.1f} GiB RAM" if self.memory_bytes else "unknown RAM"
        return " · ".join([self.cpu_model or "unknown CPU", cores, memory, self.python, self.system])


def _total_memory(meminfo: Path) -> int | None:
    try:
        text = meminfo.read_text()
    except OSError:
        return None
    match = re.search(r"^MemTotal:\s+(\d+)\s*kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


def _cpu_model(cpuinfo: Path) -> str | None:
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    for key in ("model name", "Hardware", "Processor", "cpu model"):
        match = re.search(rf"^{key}\s*:\s*(.+)$", text, re.MULTILINE)
        if match and match.group(1).strip():
            return " ".join(match.group(1).split())
    return None


# -- terminal ---------------------------------------------------------------------------------------


def text_table(table: Table) -> str:
    widths = [len(name) for name in table.columns]
    for row in table.rows:
        for index, cell in enumerate(row[: len(widths)]):
            widths[index] = max(widths[index], len(cell))
    right = [table.numeric(index) for index in range(len(widths))]

    def line(cells: Sequence[str]) -> str:
        triples = zip(cells, widths, right, strict=False)
        return "  ".join(cell.rjust(width) if r else cell.ljust(width) for cell, width, r in triples).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(table.columns), rule, *(line(row) for row in table.rows)])


def text_report(result: BenchResult, *, seconds: float | None = None) -> str:
    took = f" ({seconds:.1f} s)" if seconds is not None else ""
    parts = [f"== {result.title}{took}", "", result.description.strip(), "", text_table(result.table)]
    bullets = [target.line() for target in result.targets] + list(result.notes)
    if bullets:
        parts += ["", *(f"- {bullet}" for bullet in bullets)]
    for extra in result.extra_tables:
        parts += ["", extra.caption, "", text_table(extra)] if extra.caption else ["", text_table(extra)]
    return "\n".join(parts)


# -- markdown ---------------------------------------------------------------------------------------


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(table: Table) -> str:
    head = "| " + " | ".join(_cell(c) for c in table.columns) + " |"
    align = "|" + "|".join("---:" if table.numeric(i) else ":---" for i in range(len(table.columns))) + "|"
    body = ["| " + " | ".join(_cell(c) for c in row) + " |" for row in table.rows]
    return "\n".join([head, align, *body])


def _run_line(command: str, when: datetime, machine: Machine, seconds: float | None) -> str:
    took = f" · took {seconds:.1f} s" if seconds is not None else ""
    return f"_Last run {when:%Y-%m-%d %H:%M} UTC · `{command}`{took} · {machine.describe()}_"


def markdown_section(
    name: str, result: BenchResult, *, command: str, when: datetime, machine: Machine, seconds: float | None = None
) -> str:
    """The whole span for one benchmark, markers included."""
    parts = [
        f"<!-- bench:{name} -->",
        f"## {result.title}",
        "",
        _run_line(command, when, machine, seconds),
        "",
        result.description.strip(),
        "",
        markdown_table(result.table),
    ]
    bullets = [target.line() for target in result.targets] + list(result.notes)
    if bullets:
        parts += ["", *(f"- {bullet}" for bullet in bullets)]
    for extra in result.extra_tables:
        if extra.caption:
            parts += ["", extra.caption]
        parts += ["", markdown_table(extra)]
    parts += [f"<!-- /bench:{name} -->"]
    return "\n".join(parts)


def document_header(*, command: str, when: datetime, machine: Machine) -> str:
    return "\n".join(
        [
            HEADER_START,
            "Produced by `python -m bench` (see `bench/`); `python -m bench --only NAME` refreshes one section.",
            "",
            f"- Last run: `{command}` on {when:%Y-%m-%d %H:%M} UTC",
            f"- Machine: {machine.cpu_model or 'unknown CPU'}; {machine.cores or '?'} cores; "
            + (f"{machine.memory_bytes / 2**30:.1f} GiB RAM" if machine.memory_bytes else "unknown RAM"),
            f"- Python: {machine.python} on {machine.system}",
            "",
            "Each section names the run that produced it; sections not refreshed by the last run keep theirs.",
            HEADER_END,
        ]
    )


def _span(document: str, start: str, end: str) -> tuple[int, int] | None:
    begin = document.find(start)
    if begin < 0:
        return None
    finish = document.find(end, begin + len(start))
    if finish < 0:
        raise ValueError(f"BENCHMARKS.md has {start} without a matching {end}")
    return begin, finish + len(end)


def update_document(existing: str | None, header: str, sections: Mapping[str, str], order: Sequence[str]) -> str:
    """``existing`` with its header and the given sections replaced in place; new sections are placed by ``order``.

    A section that is new to the document goes before the first section of a benchmark listed after it in
    ``order``, or at the end. Everything else in the document is kept byte for byte.
    """
    if not existing or not existing.strip():
        body = [sections[name] for name in order if name in sections]
        body += [text for name, text in sections.items() if name not in order]
        return "\n\n".join([DOCUMENT_TITLE, header, *body]) + "\n"

    document = existing
    span = _span(document, HEADER_START, HEADER_END)
    if span is not None:
        document = document[: span[0]] + header + document[span[1] :]
    elif document.startswith("# "):
        first_line_end = document.find("\n")
        cut = len(document) if first_line_end < 0 else first_line_end + 1
        document = document[:cut] + "\n" + header + "\n\n" + document[cut:].lstrip("\n")
    else:
        document = header + "\n\n" + document

    for name, text in sections.items():
        span = _span(document, f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->")
        if span is not None:
            document = document[: span[0]] + text + document[span[1] :]
            continue
        later = list(order[order.index(name) + 1 :]) if name in order else []
        anchor = next((at for at in (document.find(f"<!-- bench:{other} -->") for other in later) if at >= 0), None)
        if anchor is None:
            document = document.rstrip("\n") + "\n\n" + text + "\n"
        else:
            document = document[:anchor] + text + "\n\n" + document[anchor:]
    return document if document.endswith("\n") else document + "\n"
