"""Public long multi-session conversations with question → evidence labels,
loaded into one shape for bench/context_quality.py.

Nothing here is vendored: the licences (LoCoMo: CC BY-NC 4.0; REALTALK: no
licence stated) do not let an Apache-2.0 repository redistribute the data.
The loaders read it from a directory (STATECAR_BENCH_DATA, default
bench/data/, which is gitignored):

    bench/data/locomo/locomo10.json       github.com/snap-research/locomo, data/locomo10.json
      (or the per-conversation files of data/locomo10.zip: bench/data/locomo/*.json)
    bench/data/realtalk/Chat_*.json       github.com/danny911kr/REALTALK, data/Chat_*.json

A missing source is skipped with a message saying how to get it.

The split is fixed by conversation id, so tuning never sees the held-out part.
REALTALK's pairs share participants within groups (chats 1-4: Emi, Elise, Kevin,
Paola; 5-7 and 8-10 other groups): the development part is a whole group, so
no held-out participant was seen while tuning.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import ROOT

DATA_ENV = "STATECAR_BENCH_DATA"
DEV = frozenset({"locomo:conv-26", "locomo:conv-30", "locomo:conv-41"} | {
    f"realtalk:Chat_{n}" for n in (1, 2, 3, 4)
})  # fmt: skip
# LoCoMo and REALTALK number their categories alike (REALTALK follows LoCoMo).
CATEGORIES = {
    1: "multi-hop",
    2: "temporal",
    3: "open-domain",
    4: "single-hop",
    5: "adversarial",
}
HOW_TO_GET = {
    "locomo": "git clone https://github.com/snap-research/locomo and copy data/locomo10.json "
    "(or unzip data/locomo10.zip's JSON files) into {dir}/locomo/ (CC BY-NC 4.0)",
    "realtalk": "git clone https://github.com/danny911kr/REALTALK and copy data/Chat_*.json "
    "into {dir}/realtalk/ (no licence stated: not redistributed)",
}
_DIA_ID = re.compile(r"D(\d+):(\d+)")


@dataclass(frozen=True, slots=True)
class Turn:
    dia_id: str
    speaker: str
    text: str
    time: str  # when the turn (or its session) was said, as the source writes it
    session: int


@dataclass(frozen=True, slots=True)
class Question:
    text: str
    category: str
    evidence: tuple[str, ...]  # dia_ids present in the conversation


@dataclass(frozen=True, slots=True)
class Conversation:
    source: str
    id: str  # "<source>:<id in the source>"
    speakers: tuple[str, str]  # (mapped to user, mapped to assistant)
    turns: tuple[Turn, ...]
    questions: tuple[Question, ...]

    @property
    def split(self) -> str:
        return "dev" if self.id in DEV else "held-out"


def data_dir() -> Path:
    return Path(os.environ.get(DATA_ENV) or ROOT / "bench" / "data")


def _sessions(conversation: dict[str, Any]) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    numbers = sorted(
        int(k.split("_")[1])
        for k, v in conversation.items()
        if re.fullmatch(r"session_\d+", k) and isinstance(v, list)
    )
    for number in numbers:
        yield number, conversation[f"session_{number}"]


def _questions(qa: list[dict[str, Any]], known: set[str]) -> tuple[Question, ...]:
    out = []
    for entry in qa:
        evidence: list[str] = []
        for raw in entry.get("evidence") or ():
            # Some labels are malformed ("D10:", "D:11:26"): keep the ids that
            # name a turn of this conversation.
            for match in _DIA_ID.finditer(str(raw).replace(" ", "")):
                dia_id = f"D{int(match[1])}:{int(match[2])}"
                if dia_id in known and dia_id not in evidence:
                    evidence.append(dia_id)
        if not evidence or not entry.get("question"):
            continue
        category = CATEGORIES.get(int(entry.get("category", 0)), str(entry.get("category")))
        out.append(Question(str(entry["question"]), category, tuple(evidence)))
    return tuple(out)


def _locomo_one(
    sample_id: str, conversation: dict[str, Any], qa: list[dict[str, Any]]
) -> Conversation:
    speakers = (str(conversation["speaker_a"]), str(conversation["speaker_b"]))
    turns = []
    for number, session in _sessions(conversation):
        when = str(conversation.get(f"session_{number}_date_time", ""))
        for turn in session:
            text = str(turn.get("text", ""))
            # A shared photo is part of what was said: LoCoMo gives its caption.
            if turn.get("blip_caption"):
                text = f"{text} [shares {turn['blip_caption']}]"
            turns.append(Turn(str(turn["dia_id"]), str(turn["speaker"]), text, when, number))
    known = {t.dia_id for t in turns}
    return Conversation(
        "locomo", f"locomo:{sample_id}", speakers, tuple(turns), _questions(qa, known)
    )


def load_locomo(directory: Path) -> list[Conversation]:
    out = []
    whole = directory / "locomo10.json"
    if whole.is_file():
        for sample in json.loads(whole.read_text()):
            out.append(_locomo_one(str(sample["sample_id"]), sample["conversation"], sample["qa"]))
        return out
    for path in sorted(directory.glob("*.json")):
        data = json.loads(path.read_text())
        if "speaker_a" in data and "qa" in data:
            out.append(_locomo_one(f"conv-{path.stem}", data, data["qa"]))
    return out


def load_realtalk(directory: Path) -> list[Conversation]:
    out = []
    for path in sorted(directory.glob("Chat_*.json")):
        data = json.loads(path.read_text())
        names = data.get("name", {})
        first = str(names.get("speaker_1", ""))
        second = str(names.get("speaker_2", ""))
        turns = []
        for number, session in _sessions(data):
            for turn in session:
                text = str(turn.get("clean_text") or turn.get("text") or "")
                if not text.strip():
                    continue
                # Speaker names differ in case between the header and turns.
                speaker = str(turn.get("speaker", ""))
                canonical = first if speaker.lower() == first.lower() else second
                turns.append(
                    Turn(
                        str(turn["dia_id"]), canonical, text, str(turn.get("date_time", "")), number
                    )
                )
        known = {t.dia_id for t in turns}
        match = re.match(r"(Chat_\d+)", path.stem)
        cid = match[1] if match else path.stem
        out.append(
            Conversation(
                "realtalk",
                f"realtalk:{cid}",
                (first, second),
                tuple(turns),
                _questions(data["qa"], known),
            )
        )
    return out


def load_all(directory: Path | None = None) -> tuple[list[Conversation], list[str]]:
    """The conversations found, and a line per source that is missing."""
    directory = directory or data_dir()
    conversations: list[Conversation] = []
    missing = []
    for source, loader in (("locomo", load_locomo), ("realtalk", load_realtalk)):
        found = loader(directory / source) if (directory / source).is_dir() else []
        if not found:
            missing.append(f"{source}: not found; " + HOW_TO_GET[source].format(dir=directory))
        conversations += found
    return conversations, missing
