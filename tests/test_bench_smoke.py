"""The benchmark harness in smoke mode, in-process: what CI's `python -m bench --smoke` relies on."""

from __future__ import annotations

import random
import sys
from pathlib import Path
from types import ModuleType

import pytest

from bench import __main__ as harness
from bench import schedule_sim
from bench.report import BenchResult, Table, update_document


@pytest.fixture(scope="module")
def smoke_run() -> harness.BenchRun:
    (run,) = harness.run_selected(["schedule_sim"], smoke=True)
    return run


def test_schedule_sim_smoke_produces_a_table_and_the_target(smoke_run: harness.BenchRun) -> None:
    assert smoke_run.ok, smoke_run.error
    result = smoke_run.result
    assert isinstance(result, BenchResult)
    assert result.table.rows and not result.problems()
    assert any(row[0].startswith("bot default: AdaptiveSchedule") for row in result.table.rows)
    assert any("PollSchedule(" in row[0] and row[0].startswith("fallback") for row in result.table.rows)
    (target,) = result.targets
    assert "no fixed interval gives both fewer polls and lower mean latency" in target.statement
    assert target.line().startswith(("Target met:", "Target MISSED:"))
    assert smoke_run.seconds < 10


def test_cli_smoke_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "BENCHMARKS.md"
    assert harness.main(["--smoke", "--only", "schedule_sim", "--output", str(output)]) == 0
    assert not output.exists()
    printed = capsys.readouterr().out
    assert schedule_sim.TITLE in printed and "1/1 benchmark(s) ok" in printed


def test_unknown_and_missing_benchmarks_are_clear_errors(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert harness.main(["--smoke", "--only", "nope"]) == 2
    assert "unknown benchmark(s): nope" in capsys.readouterr().err
    monkeypatch.setattr(harness, "BENCHMARKS", ["not_written_yet"])
    (run,) = harness.run_selected(["not_written_yet"], smoke=True)
    assert not run.ok and run.error is not None and "bench/not_written_yet.py does not exist" in run.error


def test_document_update_replaces_only_the_sections_that_ran() -> None:
    def section(name: str, body: str) -> str:
        return f"<!-- bench:{name} -->\n## {name}\n{body}\n<!-- /bench:{name} -->"

    first = update_document(None, "<!-- bench-header -->\nH1\n<!-- /bench-header -->",
                            {"a": section("a", "old a"), "c": section("c", "old c")}, ["a", "b", "c"])
    edited = first.replace("## c", "## c\nkept by hand")
    second = update_document(edited, "<!-- bench-header -->\nH2\n<!-- /bench-header -->",
                             {"b": section("b", "new b"), "a": section("a", "new a")}, ["a", "b", "c"])
    assert "H2" in second and "H1" not in second
    assert "new a" in second and "old a" not in second
    assert "kept by hand" in second and "old c" in second
    assert second.index("## a") < second.index("## b") < second.index("## c")


def _fake_benchmark(name: str, result: BenchResult | None) -> ModuleType:
    module = ModuleType(f"bench.{name}")

    async def run(smoke: bool) -> BenchResult:
        if result is None:
            raise RuntimeError("boom")
        return result

    module.NAME = name  # type: ignore[attr-defined]
    module.TITLE = name.title()  # type: ignore[attr-defined]
    module.run = run  # type: ignore[attr-defined]
    return module


def test_a_raising_or_empty_benchmark_fails_the_smoke_run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = BenchResult(title="Empty", description="d", table=Table(columns=["x"], rows=[]))
    monkeypatch.setitem(sys.modules, "bench.fake_empty", _fake_benchmark("fake_empty", empty))
    monkeypatch.setitem(sys.modules, "bench.fake_raising", _fake_benchmark("fake_raising", None))
    monkeypatch.setattr(harness, "BENCHMARKS", ["fake_empty", "fake_raising"])
    assert harness.main(["--smoke"]) == 1
    captured = capsys.readouterr()
    assert "the table has no rows" in captured.err and "RuntimeError: boom" in captured.err
    assert "0/2 benchmark(s) ok; failed: fake_empty, fake_raising" in captured.out


def test_learned_schedule_follows_elapsed_time_not_attempts() -> None:
    learned = schedule_sim.LearnedSchedule(jitter=0.0, min_observations=50, refit_every=50)
    assert learned.plan is None
    assert learned.delay(0, 0.0) == learned.fallback.base_delay(0)
    rng = random.Random(0)
    for _ in range(200):
        ready = rng.uniform(5.0, 15.0)
        learned.observe(ready, ready)
    plan = learned.plan
    assert plan is not None and plan[0] == 0.0
    # Nothing becomes Ready before 5 s: the first gap waits for it.
    assert plan[1] > 2.0
    # On the plan, the next poll is the next planned one, whatever the attempt number says.
    assert learned.delay(7, plan[2]) == pytest.approx(plan[3] - plan[2])
    # Between planned polls (a slow request), the gap is between the two planned gaps around it.
    middle = (plan[2] + plan[3]) / 2
    low, high = sorted([plan[3] - plan[2], plan[4] - plan[3]])
    assert low <= learned.delay(0, middle) <= high


@pytest.mark.parametrize("name", ["scale", "delivery", "startup"])
def test_benchmark_smoke_runs(name: str) -> None:
    (run,) = harness.run_selected([name], smoke=True)
    assert run.ok, run.error
    assert run.result is not None and run.result.table.rows
