"""Multiple-choice answers: the prompt lmms-eval uses, deterministic letter extraction, metrics.

Extraction never guesses: a response with no recognisable option letter counts as wrong (and
the caller logs it), so two runs over the same responses always score the same.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Sequence

LETTERS = "ABCDE"

#: Video-MME's instruction in lmms-eval (FIELD_NOTES), shared by the other video MC tasks.
MC_PREFIX = ("Select the best answer to the following multiple-choice question based on the video. "
             "Respond with only the letter ({letters}) of the correct option.")
MC_SUFFIX = "Answer with the option's letter from the given choices directly."


def letters_for(n_options: int) -> str:
    if not 2 <= n_options <= len(LETTERS):
        raise ValueError(f"a multiple-choice question needs 2 to {len(LETTERS)} options, got {n_options}")
    return LETTERS[:n_options]


def format_options(options: Sequence[str]) -> list[str]:
    """``["A. first", "B. second", ...]``; options that already start with their letter keep it."""
    out = []
    for letter, text in zip(letters_for(len(options)), options):
        text = str(text).strip()
        out.append(text if re.match(rf"^{letter}[.)]\s", text) else f"{letter}. {text}")
    return out


def mc_prompt(question: str, options: Sequence[str], *, subtitles: str | None = None) -> str:
    """The lmms-eval multiple-choice prompt: instruction, question, lettered options, suffix."""
    letters = letters_for(len(options))
    spelled = ", ".join(letters[:-1]) + f", or {letters[-1]}"
    parts = []
    if subtitles:
        parts.append("This video's subtitles are listed below:\n" + subtitles.strip())
    parts += [MC_PREFIX.format(letters=spelled), question.strip(), *format_options(options), MC_SUFFIX]
    return "\n".join(parts)


_PATTERNS = (
    # The whole response is the letter, maybe bracketed or punctuated: "B", "(b)", "B.", "**B**".
    re.compile(r"^\W*([A-Ea-e])\W*$"),
    # Starts with the letter then a separator: "B. The man", "(B) ...", "B: ...", "B) ...".
    re.compile(r"^\W*([A-E])(?:[.:)\]]|\s*-)(?:\s|$)"),
    # "The answer is B", "answer: (b)", "Answer - C", "the correct option is D".
    re.compile(r"\b(?:answer|option|choice)\s*(?:is|would be|should be)?\s*[:\-]?\s*\(?\**([A-Ea-e])\b(?![a-z'])",
               re.IGNORECASE),
    # A bracketed capital anywhere: "I think (C) fits".
    re.compile(r"\(([A-E])\)"),
)


def extract_letter(response: str, n_options: int = 4) -> str | None:
    """The option letter a model answered, or ``None`` when there is none (counted as wrong).

    Tried in order: the response is just a letter; it starts with "B." / "(B)" / "B:"; "answer
    is B" / "Option B" (any case); a bracketed capital; finally a single distinct standalone
    capital letter among the options ("I'd say B because..."). Letters beyond ``n_options``
    never count.
    """
    valid = letters_for(n_options)
    text = (response or "").strip()
    for pattern in _PATTERNS:
        match = pattern.search(text)
        if match and match.group(1).upper() in valid:
            return match.group(1).upper()
    standalone = {m for m in re.findall(r"(?<![\w'])([A-E])(?![\w'])", text) if m in valid}
    if len(standalone) == 1 and not re.search(r"(?<![\w'])A(?= [a-z])", text):
        return standalone.pop()  # "A" followed by a lower-case word is the article, above
    return None


def accuracy(records: Iterable[dict]) -> float:
    """Mean of ``record["correct"]``; NaN for no records."""
    values = [float(r["correct"]) for r in records]
    return sum(values) / len(values) if values else float("nan")


def accuracy_by(records: Iterable[dict], key: str = "category") -> dict[str, float]:
    """Accuracy per value of ``record[key]``."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        groups[str(r[key])].append(r)
    return {k: accuracy(v) for k, v in sorted(groups.items())}


def mean_of_categories(records: Iterable[dict], key: str = "category") -> float:
    """Unweighted mean of the per-category accuracies (MLVU's M-Avg)."""
    per = accuracy_by(records, key)
    return sum(per.values()) / len(per) if per else float("nan")
