"""The context quality benchmark's loaders read both public formats (on small
files written here: the real data is not in the repository)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import conversations
from bench.context_quality import pick_questions


def locomo_conversation() -> dict[str, object]:
    return {
        "speaker_a": "Ana",
        "speaker_b": "Bo",
        "session_1_date_time": "1:56 pm on 8 May, 2023",
        "session_1": [
            {"speaker": "Ana", "dia_id": "D1:1", "text": "I adopted a cat."},
            {
                "speaker": "Bo",
                "dia_id": "D1:2",
                "text": "Look!",
                "blip_caption": "a photo of a red kite",
            },
        ],
        "session_2_date_time": "2:00 pm on 9 May, 2023",
        "session_2": [{"speaker": "Ana", "dia_id": "D2:1", "text": "The cat is called Mo."}],
    }


QA = [
    {"question": "What did Ana adopt?", "evidence": ["D1:1"], "category": 4},
    {"question": "What is it called?", "evidence": ["D1:1; D2:1", "D9:9"], "category": 1},
    {"question": "Malformed label", "evidence": ["D10:"], "category": 2},
]


def test_locomo_both_layouts(tmp_path: Path) -> None:
    whole = tmp_path / "a" / "locomo"
    whole.mkdir(parents=True)
    sample = {"sample_id": "conv-26", "conversation": locomo_conversation(), "qa": QA}
    (whole / "locomo10.json").write_text(json.dumps([sample]))
    split = tmp_path / "b" / "locomo"
    split.mkdir(parents=True)
    (split / "26.json").write_text(json.dumps({**locomo_conversation(), "qa": QA}))
    for directory in (tmp_path / "a", tmp_path / "b"):
        found, missing = conversations.load_all(directory)
        assert [c.id for c in found] == ["locomo:conv-26"] and len(missing) == 1
        (conv,) = found
        assert conv.split == "dev" and conv.speakers == ("Ana", "Bo")
        assert conv.turns[1].text == "Look! [shares a photo of a red kite]"
        assert conv.turns[2].time == "2:00 pm on 9 May, 2023"
        # Unknown and malformed evidence ids are dropped, with their question if none is left.
        assert [(q.category, q.evidence) for q in conv.questions] == [
            ("single-hop", ("D1:1",)),
            ("multi-hop", ("D1:1", "D2:1")),
        ]


def test_realtalk_and_a_missing_source_says_how_to_get_it(tmp_path: Path) -> None:
    directory = tmp_path / "realtalk"
    directory.mkdir()

    def said(text: str, speaker: str, n: int) -> dict[str, str]:
        return {"clean_text": text, "speaker": speaker, "date_time": f"{n}.12.2023, 22:42:04",
                "dia_id": f"D1:{n}"}  # fmt: skip

    chat = {
        "name": {"speaker_1": "Emi", "speaker_2": "Elise"},
        "session_1": [said("hi", "Emi", 1), said("hey", "elise", 2), said("", "Emi", 3)],
        "qa": [{"question": "Who?", "evidence": ["D1:2"], "category": 3}],
    }
    (directory / "Chat_12_Emi_Elise.json").write_text(json.dumps(chat))
    found, missing = conversations.load_all(tmp_path)
    (conv,) = found
    assert conv.id == "realtalk:Chat_12" and conv.split == "held-out"
    assert [t.speaker for t in conv.turns] == ["Emi", "Elise"]  # empty message skipped
    assert conv.questions[0].category == "open-domain"
    assert missing and missing[0].startswith("locomo: not found; git clone")


@pytest.mark.parametrize(("n", "limit"), [(10, 0), (10, 3), (10, 10), (7, 20), (197, 40)])
def test_question_subsets_are_spread_and_bounded(n: int, limit: int) -> None:
    conv = conversations.Conversation(
        "x",
        "x:1",
        ("a", "b"),
        (),
        tuple(conversations.Question(str(i), "c", ("D1:1",)) for i in range(n)),
    )
    picked = pick_questions(conv, limit)
    assert picked == sorted(set(picked)) and all(0 <= i < n for i in picked)
    assert len(picked) == (n if limit <= 0 or limit >= n else limit)
