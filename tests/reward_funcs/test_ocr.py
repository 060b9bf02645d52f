"""Tests for the OCR reward: the text-matching logic, and real OCR (RapidOCR's bundled weights) on rendered text."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw, ImageFont

from reward_funcs import _common
from reward_funcs.ocr import edit_distance, extract_quoted_text, make_ocr, normalize_text, ocr, text_similarity
from trl_flow.errors import UserInputError

FONT = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf")


def render(text: str, size: tuple[int, int] = (320, 96), font_size: int = 44) -> Image.Image:
    """Black text on white, in DejaVu Sans Bold if installed, else Pillow's built-in font."""
    image = Image.new("RGB", size, "white")
    font = ImageFont.truetype(str(FONT), font_size) if FONT.is_file() else ImageFont.load_default(size=font_size)
    ImageDraw.Draw(image).text((16, 20), text, fill="black", font=font)
    return image


# ----------------------------------------------------------------------------------------------- matching


@pytest.mark.parametrize(
    ("a", "b", "distance"),
    [
        ("", "", 0),
        ("abc", "", 3),
        ("", "abc", 3),
        ("kitten", "sitting", 3),
        ("flaw", "lawn", 2),
        ("OPEN", "OPEN", 0),
        ("OPEN", "OPNE", 2),
        ("abc", "abcd", 1),
    ],
)
def test_edit_distance(a: str, b: str, distance: int) -> None:
    assert edit_distance(a, b) == distance
    assert edit_distance(b, a) == distance


def test_normalization_and_similarity() -> None:
    assert normalize_text(" Hello\tWorld\n") == "helloworld"
    assert normalize_text("Hello World", case_sensitive=True) == "HelloWorld"
    assert normalize_text("ﬁne") == "fine"  # NFKC: the ligature becomes two letters
    assert text_similarity("HELLO WORLD", "hello world") == 1.0
    assert text_similarity("HELLO", "hello", case_sensitive=True) == 0.0
    assert text_similarity("HELO", "HELLO") == pytest.approx(0.8)
    assert text_similarity("HELLO extra", "HELLO") == pytest.approx(1 - 5 / 10)  # extra text costs
    assert text_similarity("", "HELLO") == 0.0
    assert text_similarity("", "") == 1.0


@pytest.mark.parametrize(
    ("prompt", "target"),
    [
        ('a sign that says "OPEN"', "OPEN"),
        ("a neon sign \u201cBar 24\u201d at night", "Bar 24"),
        ("\u00abBonjour\u00bb written in chalk", "Bonjour"),
        ('a poster with "Big" and "Sale"', "Big Sale"),
        ("a cat's toy", None),
        ('empty quotes ""', None),
    ],
)
def test_extract_quoted_text(prompt: str, target: str | None) -> None:
    assert extract_quoted_text(prompt) == target


def test_targets_from_columns_and_prompts() -> None:
    seen: list[Image.Image] = []

    def fake_engine(image: Image.Image) -> list[tuple[str, float]]:
        seen.append(image)
        return [("HEL", 0.9), ("LO", 0.95), ("noise", 0.1)]

    reward = make_ocr(engine=fake_engine, min_confidence=0.5)
    image = Image.new("RGB", (8, 8))
    assert reward(['say "hello"', "no target", 'say "bye"'], [image] * 3) == [1.0, None, 0.0]
    assert len(seen) == 2  # images without a target are not read
    # a `text` column wins over the prompt; `target_text` is the second choice; empty targets are skipped
    assert reward(['"bye"', '"bye"'], [image] * 2, text=["hello", ""]) == [1.0, None]
    assert reward(['"bye"'], [image], target_text=["hello"]) == [1.0]
    custom = make_ocr(target_column="words", engine=fake_engine)
    assert custom(['"bye"'], [image], words=["HELLO noise"]) == [1.0]
    with pytest.raises(UserInputError, match="needs the dataset column 'words'"):
        custom(['"bye"'], [image])
    with pytest.raises(UserInputError, match="target text 0 is a int"):
        reward(["x"], [image], text=[3])


def test_missing_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_common, "_CACHE", {})
    monkeypatch.setitem(sys.modules, "rapidocr_onnxruntime", None)  # makes the import fail
    with pytest.raises(UserInputError, match=r"pip install 'trl-flow\[ocr\]'"):
        make_ocr()(['"HELLO"'], [render("HELLO")])


# --------------------------------------------------------------------------------------------- real OCR


def test_real_ocr_on_rendered_text() -> None:
    pytest.importorskip("rapidocr_onnxruntime")
    hello, open_sign = render("HELLO"), render("Open 24 Hours", size=(400, 96), font_size=40)
    prompts = [
        'a sign that says "HELLO"',
        'a sign that says "GOODBYE"',
        'a shop sign "open 24 hours"',
        'a sign that says "CLOSED"',
        'a blank board "HELLO"',
    ]
    blank = Image.new("RGB", (320, 96), "white")
    extras = {"completion_ids": None, "trainer_state": None, "log_extra": print, "log_metric": print}
    scores = ocr(prompts, [hello, hello, open_sign, open_sign, blank], **extras)
    assert ocr.__name__ == "ocr"
    assert all(type(s) is float for s in scores)
    right, wrong, right_sentence, wrong_sentence, nothing = scores
    assert right > 0.8 and right_sentence > 0.8
    assert wrong < 0.3 and wrong_sentence < 0.5 and nothing == 0.0
