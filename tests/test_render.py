"""render.py is pure: every Discord limit and every ending's wording is checked here without a network."""

from __future__ import annotations

import io

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from bot.cometapi import StatusKind, TaskState
from bot.images import ImageFile, sniff
from bot.render import (
    CONTENT_LIMIT,
    DESCRIPTION_LIMIT,
    EMBED_TOTAL_LIMIT,
    FIELD_LIMIT,
    TITLE_LIMIT,
    clip,
    render_final,
    render_progress,
    safe_text,
)
from bot.tracking import EndReason, Outcome


def _png(width: int = 8, height: int = 6) -> ImageFile:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buffer, "PNG")
    return sniff(buffer.getvalue())


def _ready(prompt: str | None = "a red kite", **kw: object) -> TaskState:
    return TaskState(task_id="t1", kind=StatusKind.READY, status="Ready", prompt=prompt, seed=7, duration=4.25,
                     image_urls=("https://img.example/sample.png",), **kw)  # type: ignore[arg-type]


def _check_limits(parts_embed_dict: dict[str, object], total: int) -> None:
    assert total <= EMBED_TOTAL_LIMIT
    assert len(str(parts_embed_dict.get("title", ""))) <= TITLE_LIMIT
    assert len(str(parts_embed_dict.get("description", ""))) <= DESCRIPTION_LIMIT
    for field in parts_embed_dict.get("fields", []):  # type: ignore[attr-defined]
        assert len(field["value"]) <= FIELD_LIMIT
        assert len(field["name"]) <= 256


def test_progress_shows_status_as_it_came_progress_and_relative_time() -> None:
    state = TaskState(task_id="t1", kind=StatusKind.PENDING, status="Queued", progress=0.42)
    parts = render_progress(state, "t1", 1_700_000_000.7)
    assert parts.embed is not None and parts.show_cancel
    fields = {f.name: f.value for f in parts.embed.fields}
    assert fields["Status"] == "`Queued`"
    assert "42%" in str(fields["Progress"])
    assert fields["Started"] == "<t:1700000000:R>"
    assert fields["Task"] == "`t1`"


def test_progress_without_state_or_progress_has_no_progress_field() -> None:
    parts = render_progress(None, "t1", 0)
    assert parts.embed is not None
    assert "Progress" not in {f.name for f in parts.embed.fields}


def test_signature_changes_only_when_what_is_shown_changes() -> None:
    a = TaskState(task_id="t1", kind=StatusKind.PENDING, status="Pending", progress=0.101)
    b = TaskState(task_id="t1", kind=StatusKind.PENDING, status="Pending", progress=0.104)
    c = TaskState(task_id="t1", kind=StatusKind.PENDING, status="Pending", progress=0.5)
    sig = [render_progress(s, "t1", 5).signature() for s in (a, b, c)]
    assert sig[0] == sig[1]
    assert sig[0] != sig[2]


def test_ready_attaches_image_and_shows_it_in_the_embed() -> None:
    image = _png()
    outcome = Outcome(task_id="t1", reason=EndReason.READY, state=_ready(), image=image, elapsed=3.0)
    parts = render_final(outcome, image=image, original_size=len(image.data))
    assert parts.image is image and parts.filename == "flux-t1.png"
    assert parts.embed is not None and parts.embed.image.url == "attachment://flux-t1.png"
    assert parts.embed.description == "a red kite"
    fields = {f.name: f.value for f in parts.embed.fields}
    assert fields["Seed"] == "`7`" and fields["Generated in"] == "4.2 s"
    assert not parts.show_cancel


def test_ready_reencoded_says_so_and_unfittable_gives_link_with_explanation() -> None:
    image = _png()
    outcome = Outcome(task_id="t1", reason=EndReason.READY, state=_ready(), image=image)
    parts = render_final(outcome, image=image, original_size=len(image.data) * 3)
    assert parts.embed is not None and "re-encoded" in str(parts.embed.footer.text)
    parts = render_final(outcome, image=None, original_size=len(image.data), limit=10 * 1024 * 1024)
    assert parts.image is None
    assert parts.content == "https://img.example/sample.png"
    assert parts.embed is not None
    note = {f.name: f.value for f in parts.embed.fields}["Note"]
    assert "10.0 MiB" in str(note) and "expires" in str(note)


def test_hostile_prompt_is_inert_and_within_limits() -> None:
    prompt = "@everyone <@123456789012345678> **bold** " + "x" * 10_000
    image = _png()
    outcome = Outcome(task_id="t1", reason=EndReason.READY, state=_ready(prompt), image=image)
    parts = render_final(outcome, image=image)
    assert parts.embed is not None
    description = parts.embed.description or ""
    assert "@everyone" not in description  # escape_mentions puts a zero-width space in
    assert "<@123456789012345678>" not in description
    assert "\\*\\*bold\\*\\*" in description
    _check_limits(parts.embed.to_dict(), len(parts.embed))  # type: ignore[arg-type]


@pytest.mark.parametrize("reason", [r for r in EndReason if r is not EndReason.READY])
def test_every_ending_has_a_clear_final_message(reason: EndReason) -> None:
    state = TaskState(task_id="t1", kind=StatusKind.FAILED, status="Error", details="boom")
    outcome = Outcome(task_id="t1", reason=reason, state=state, detail="why it ended", elapsed=12.0)
    parts = render_final(outcome, reference="ab12cd34")
    assert parts.embed is not None and parts.embed.title
    assert parts.embed.description and len(parts.embed.description) > 20
    assert not parts.show_cancel and parts.image is None


def test_moderation_reasons_and_timeout_details_are_shown() -> None:
    state = TaskState(task_id="t1", kind=StatusKind.MODERATED, status="Content Moderated",
                      moderation_reasons=("Derivative Works",))
    parts = render_final(Outcome(task_id="t1", reason=EndReason.MODERATED, state=state, detail="Derivative Works"))
    assert parts.embed is not None and "Derivative Works" in (parts.embed.description or "")
    pending = TaskState(task_id="t1", kind=StatusKind.PENDING, status="Pending")
    parts = render_final(Outcome(task_id="t1", reason=EndReason.TIMEOUT, state=pending, elapsed=600.0))
    assert parts.embed is not None
    assert "10 min 00 s" in (parts.embed.description or "") and "`Pending`" in (parts.embed.description or "")


def test_internal_error_carries_reference_and_cancel_names_who() -> None:
    parts = render_final(Outcome(task_id="t1", reason=EndReason.INTERNAL), reference="ab12cd34")
    assert parts.embed is not None and "ab12cd34" in (parts.embed.description or "")
    parts = render_final(Outcome(task_id="t1", reason=EndReason.STOPPED), stopped_by="Ada @everyone")
    assert parts.embed is not None and "Ada" in (parts.embed.description or "")
    assert "@everyone" not in (parts.embed.description or "")


def test_clip_never_exceeds_and_never_ends_in_an_escape() -> None:
    assert clip("abc", 3) == "abc"
    assert clip("abcd", 3) == "ab…"
    assert not clip("a\\\\\\\\b" * 10, 5)[:-1].endswith("\\")


@settings(max_examples=200, deadline=None)
@given(prompt=st.text(max_size=7000), task_id=st.text(min_size=1, max_size=128), detail=st.text(max_size=3000),
       status=st.text(min_size=1, max_size=120))
def test_any_text_stays_within_discord_limits(prompt: str, task_id: str, detail: str, status: str) -> None:
    state = TaskState(task_id=task_id, kind=StatusKind.READY, status=status, prompt=prompt, details=detail)
    for reason in EndReason:
        parts = render_final(Outcome(task_id=task_id, reason=reason, state=state, detail=detail),
                             stopped_by=detail, reference="r")
        assert parts.content is None or len(parts.content) <= CONTENT_LIMIT
        assert parts.embed is not None
        _check_limits(parts.embed.to_dict(), len(parts.embed))  # type: ignore[arg-type]
    parts = render_progress(state, task_id, 0)
    assert parts.embed is not None
    _check_limits(parts.embed.to_dict(), len(parts.embed))  # type: ignore[arg-type]


def test_safe_text_escapes_markdown_and_mentions() -> None:
    text = safe_text("_x_ @here <@&123456789012345678>", 100)
    assert "@here" not in text and "<@&123456789012345678>" not in text and "\\_x\\_" in text
