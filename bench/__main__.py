"""Benchmark harness: ``python -m bench [--smoke] [--only NAME[,NAME]] [--no-write]``.

A benchmark is a module ``bench/NAME.py`` that defines

    NAME: str                                  # equal to the module name
    TITLE: str                                 # the section heading in BENCHMARKS.md
    async def run(smoke: bool) -> BenchResult  # bench.report.BenchResult

and is registered by adding NAME to :data:`BENCHMARKS` below (the order is the order of the sections in
BENCHMARKS.md). ``smoke=True`` asks for a tiny size that finishes in seconds: CI runs ``python -m bench --smoke``
and fails if a benchmark raises or returns an empty table. Each benchmark runs in its own event loop.

Without ``--smoke`` or ``--no-write`` the results are written to BENCHMARKS.md at the repository root,
replacing only the sections of the benchmarks that ran (see :mod:`bench.report`).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import inspect
import shlex
import sys
import time
import traceback
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any, cast

from bench.report import BenchResult, Machine, document_header, markdown_section, text_report, update_document

BENCHMARKS: list[str] = [
    "schedule_sim", "scale", "delivery", "startup",
]

REPOSITORY = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = REPOSITORY / "BENCHMARKS.md"

RunFunction = Callable[[bool], Coroutine[Any, Any, BenchResult]]


class BenchmarkError(Exception):
    """A registered benchmark cannot be loaded: missing module or a module that breaks the contract."""


@dataclass(frozen=True, slots=True)
class Benchmark:
    name: str
    title: str
    run: RunFunction


@dataclass(slots=True)
class BenchRun:
    """How one benchmark went: a result, or the error that stopped it."""

    name: str
    result: BenchResult | None = None
    error: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.result is not None and self.error is None


def load(name: str) -> Benchmark:
    """Import ``bench.NAME`` and check that it exposes NAME, TITLE and ``async def run(smoke)``."""
    module_name = f"{__package__ or 'bench'}.{name}"
    try:
        module: ModuleType = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name != module_name:
            raise  # the module exists but imports something that does not: let that error speak
        raise BenchmarkError(
            f"benchmark {name!r} is listed in bench/__main__.py BENCHMARKS but bench/{name}.py does not exist"
        ) from None
    declared = getattr(module, "NAME", None)
    if declared != name:
        raise BenchmarkError(f"bench/{name}.py must set NAME = {name!r} (found {declared!r})")
    title = getattr(module, "TITLE", None)
    if not isinstance(title, str) or not title:
        raise BenchmarkError(f"bench/{name}.py must set TITLE to a non-empty string")
    run = getattr(module, "run", None)
    if not inspect.iscoroutinefunction(run):
        raise BenchmarkError(f"bench/{name}.py must define `async def run(smoke: bool) -> BenchResult`")
    return Benchmark(name=name, title=title, run=cast(RunFunction, run))


def run_one(name: str, *, smoke: bool) -> BenchRun:
    started = time.perf_counter()
    try:
        benchmark = load(name)
        result = asyncio.run(benchmark.run(smoke))
    except Exception as exc:
        detail = str(exc) if isinstance(exc, BenchmarkError) else traceback.format_exc().rstrip()
        return BenchRun(name, error=detail, seconds=time.perf_counter() - started)
    seconds = time.perf_counter() - started
    if not isinstance(result, BenchResult):
        return BenchRun(name, error=f"run() returned {type(result).__name__}, not BenchResult", seconds=seconds)
    problems = result.problems()
    if problems:
        return BenchRun(name, result=result, error="; ".join(problems), seconds=seconds)
    return BenchRun(name, result=result, seconds=seconds)


def run_selected(names: Sequence[str], *, smoke: bool) -> list[BenchRun]:
    return [run_one(name, smoke=smoke) for name in names]


def select(only: str | None, registered: Sequence[str]) -> list[str]:
    """The benchmarks to run, in registry order; raises ValueError naming any unknown name."""
    if not only:
        return list(registered)
    wanted = [part.strip() for part in only.split(",") if part.strip()]
    unknown = [name for name in wanted if name not in registered]
    if unknown:
        raise ValueError(f"unknown benchmark(s): {', '.join(unknown)}; known: {', '.join(registered)}")
    return [name for name in registered if name in wanted]


def write_results(runs: Sequence[BenchRun], *, output: Path, command: str, registered: Sequence[str]) -> list[str]:
    """Update ``output`` with the sections of the runs that succeeded; returns their names."""
    when = datetime.now(UTC)
    machine = Machine.current()
    sections = {
        run.name: markdown_section(run.name, run.result, command=command, when=when, machine=machine,
                                   seconds=run.seconds)
        for run in runs
        if run.ok and run.result is not None
    }
    if not sections:
        return []
    existing = output.read_text(encoding="utf-8") if output.exists() else None
    header = document_header(command=command, when=when, machine=machine)
    output.write_text(update_document(existing, header, sections, registered), encoding="utf-8")
    return list(sections)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description="Run fluxbot's benchmarks.")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny sizes, check every benchmark produces a table; never writes BENCHMARKS.md")
    parser.add_argument("--only", metavar="NAME[,NAME]", help=f"run only these ({', '.join(BENCHMARKS)})")
    parser.add_argument("--no-write", action="store_true", help="print the results; leave BENCHMARKS.md alone")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, metavar="PATH",
                        help="the markdown file to update (default: BENCHMARKS.md at the repository root)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    options = parse_args(arguments)
    try:
        names = select(options.only, BENCHMARKS)
    except ValueError as exc:
        print(f"python -m bench: {exc}", file=sys.stderr)
        return 2
    command = shlex.join(["python", "-m", "bench", *arguments])
    mode = "smoke" if options.smoke else "full"
    print(f"{command}: {len(names)} benchmark(s), {mode} size", flush=True)

    runs: list[BenchRun] = []
    for name in names:
        run = run_one(name, smoke=options.smoke)
        runs.append(run)
        print()
        if run.result is not None:
            print(text_report(run.result, seconds=run.seconds))
        if run.error is not None:
            print(f"!! benchmark {name} failed after {run.seconds:.1f} s:\n{run.error}", file=sys.stderr)
        sys.stdout.flush()

    failed = [run.name for run in runs if not run.ok]
    print()
    summary = f"{len(runs) - len(failed)}/{len(runs)} benchmark(s) ok"
    print(summary + (f"; failed: {', '.join(failed)}" if failed else ""))
    if not (options.smoke or options.no_write):
        written = write_results(runs, output=options.output, command=command, registered=BENCHMARKS)
        if written:
            print(f"updated {options.output} ({', '.join(written)})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
