"""Label encodings of the five EnECG tasks and the mappings from each source's codes to them.

Encodings (every label may be missing, stored as null):

- `rr_interval`: mean interval between successive R peaks, milliseconds (float).
- `age`: years (float). PTB-XL's 300 ("over 89") is stored as 90; in any other source 300 is out of range.
- `sex`: `SEX_LABELS` index, 0 = female, 1 = male.
- `potassium_flag`: `POTASSIUM_LABELS` index, 0 = normal, 1 = abnormal serum potassium.
- `arrhythmia`: one of `ARRHYTHMIA_CLASSES` (the rhythm of the record; `"other"` is any other recognised rhythm
  statement). A record whose statements name no rhythm has no arrhythmia label.

When a record carries several rhythm statements, the first class in `RHYTHM_PRIORITY` wins (atrial fibrillation
over atrial flutter over sinus tachycardia/bradycardia over sinus rhythm over other).

A value that is present but unusable is stored as missing, never guessed: a number must be one as a whole (`"-5"`,
`"1e-3"`; not `"abc12"` or `[5]`: `not_a_number`) and lie in the task's `valid_range` (`TASKS`; `-5` or `1e9` years:
`out_of_range`); sex and potassium must be one of their spellings (`unknown_value`). The parsers append the reason to
the `notes` list they are given, which the data builders put in the build report's `label_notes`.
"""

from __future__ import annotations

import math
import numbers
import re
from typing import Any, Iterable

from .tasks import ARRHYTHMIA_CLASSES, TASKS, is_missing

# The encodings of the task table (`tasks.TASKS`), under the names the loaders use.
SEX_LABELS = TASKS["sex"].class_names
POTASSIUM_LABELS = TASKS["potassium_flag"].class_names
LABEL_COLUMNS = tuple(TASKS)

RHYTHM_PRIORITY = (
    "atrial_fibrillation",
    "atrial_flutter",
    "sinus_tachycardia",
    "sinus_bradycardia",
    "sinus_rhythm",
    "other",
)

# SNOMED-CT rhythm codes of the PhysioNet/CinC Challenge 2020/2021 label set (dx_mapping_scored/unscored.csv).
SNOMED_RHYTHMS = {
    "426783006": "sinus_rhythm",  # sinus rhythm (NSR)
    "426177001": "sinus_bradycardia",  # sinus bradycardia (SB)
    "427084000": "sinus_tachycardia",  # sinus tachycardia (STach)
    "164889003": "atrial_fibrillation",  # atrial fibrillation (AF)
    "195080001": "atrial_fibrillation",  # atrial fibrillation and flutter (AFAFL)
    "426749004": "atrial_fibrillation",  # chronic atrial fibrillation (CAF)
    "282825002": "atrial_fibrillation",  # paroxysmal atrial fibrillation (PAF)
    "314208002": "atrial_fibrillation",  # rapid atrial fibrillation (RAF)
    "164890007": "atrial_flutter",  # atrial flutter (AFL)
    "427393009": "other",  # sinus arrhythmia (SA)
    "426627000": "other",  # bradycardia (Brady)
    "106068003": "other",  # atrial rhythm (ARH)
    "713422000": "other",  # atrial tachycardia (ATach)
    "233892002": "other",  # accelerated atrial escape rhythm (AAR)
    "17366009": "other",  # sinus atrium to atrial wandering rhythm (SAAWR)
    "195101003": "other",  # wandering atrial pacemaker (WAP)
    "426761007": "other",  # supraventricular tachycardia (SVT)
    "67198005": "other",  # paroxysmal supraventricular tachycardia (PSVT)
    "251166008": "other",  # atrioventricular node reentrant tachycardia (AVNRT)
    "233897008": "other",  # atrioventricular reentrant tachycardia (AVRT)
    "29320008": "other",  # atrioventricular junctional rhythm (AVJR)
    "426664006": "other",  # accelerated junctional rhythm (AJR)
    "426995002": "other",  # junctional escape (JE)
    "426648003": "other",  # junctional tachycardia (JTach)
    "49260003": "other",  # idioventricular rhythm (IR)
    "61277005": "other",  # accelerated idioventricular rhythm (AIVR)
    "81898007": "other",  # ventricular escape rhythm (VEsR)
    "164895002": "other",  # ventricular tachycardia (VTach)
    "425856008": "other",  # paroxysmal ventricular tachycardia (PVT)
    "111288001": "other",  # ventricular flutter (VFL)
    "164896001": "other",  # ventricular fibrillation (VF)
    "10370003": "other",  # pacing rhythm (PR)
}

# PTB-XL SCP-ECG rhythm statements (`scp_statements.csv`, column `rhythm` == 1).
SCP_RHYTHMS = {
    "SR": "sinus_rhythm",
    "SBRAD": "sinus_bradycardia",
    "STACH": "sinus_tachycardia",
    "AFIB": "atrial_fibrillation",
    "AFLT": "atrial_flutter",
    "SARRH": "other",  # sinus arrhythmia
    "SVARR": "other",  # supraventricular arrhythmia
    "SVTAC": "other",  # supraventricular tachycardia
    "PSVT": "other",  # paroxysmal supraventricular tachycardia
    "PACE": "other",  # normal functioning artificial pacemaker
    "BIGU": "other",  # bigeminal pattern
    "TRIGU": "other",  # trigeminal pattern
}

# Free-text rhythm statements (LUDB `Rhythm:` lines, MIMIC-IV-ECG machine report lines, JSONL report labels),
# matched case-insensitively in this order; the first pattern found in a statement gives its class.
TEXT_RHYTHMS = (
    (r"atrial\s+fib|\bafib\b|\ba-?fib\b", "atrial_fibrillation"),
    (r"atrial\s+flutter|\baflt?\b", "atrial_flutter"),
    (r"sinus\s+tachycardia", "sinus_tachycardia"),
    (r"sinus\s+bradycardia", "sinus_bradycardia"),
    (r"sinus\s+arrhythmia|irregular\s+sinus", "other"),
    (r"(normal\s+)?sinus\s+rhythm", "sinus_rhythm"),
    (
        r"tachycardia|bradycardia|\brhythm\b|pac(ed|ing)|junctional|idioventricular|ventricular\s+fibrillation"
        r"|bigeminy|trigeminy|escape",
        "other",
    ),
)
_TEXT_PATTERNS = tuple((re.compile(pattern, re.IGNORECASE), label) for pattern, label in TEXT_RHYTHMS)


def _first_by_priority(classes: Iterable[str | None]) -> str | None:
    found = {label for label in classes if label}
    return next((label for label in RHYTHM_PRIORITY if label in found), None)


def arrhythmia_from_snomed(codes: Iterable[str]) -> str | None:
    """Rhythm class of a list of SNOMED-CT codes (Challenge `Dx:`), or `None` if none is a rhythm code."""
    return _first_by_priority(SNOMED_RHYTHMS.get(str(code).strip()) for code in codes)


def arrhythmia_from_scp(codes: Iterable[str], rhythm_statements: dict[str, str] | None = None) -> str | None:
    """Rhythm class of PTB-XL SCP codes; `rhythm_statements` (from `scp_statements.csv`) extends `SCP_RHYTHMS`."""
    table = {**(rhythm_statements or {}), **SCP_RHYTHMS}
    return _first_by_priority(table.get(str(code).strip()) for code in codes)


def arrhythmia_from_text(statements: Iterable[str]) -> str | None:
    """Rhythm class of free-text statements (`"Sinus bradycardia."`, `"Atrial fibrillation with RVR"`)."""
    classes = []
    for statement in statements:
        if not isinstance(statement, str):
            continue
        if statement.strip().lower() in ARRHYTHMIA_CLASSES:
            classes.append(statement.strip().lower())
            continue
        classes.append(next((label for pattern, label in _TEXT_PATTERNS if pattern.search(statement)), None))
    return _first_by_priority(classes)


LabelNotes = list[dict[str, str]]  # {"label", "reason", "detail"} per unusable value (`source.SourceRecord.notes`)


def _unusable(notes: LabelNotes | None, label: str, reason: str, detail: str) -> None:
    """Record why a present value of `label` is stored as missing (in `notes`, when given); returns None."""
    if notes is not None:
        notes.append({"label": label, "reason": reason, "detail": detail})
    return None


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


def _number(value: Any, label: str, notes: LabelNotes | None, original: Any = None) -> float | None:
    """`value` as a finite float when it is a number as a whole: a real number (not a bool) or text that `float`
    reads (`"78"`, `"-5"`, `"1e-3"`); NaN is missing. Anything else (`"abc12"`, `[5]`, `True`, `inf`) is refused
    with a `not_a_number` note."""
    original = value if original is None else original
    number = None
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            pass
    if number is not None and math.isnan(number):
        return None
    if number is None or not math.isfinite(number):
        return _unusable(notes, label, "not_a_number", f"{label} {_shown(original)} is not a finite number")
    return number


def _in_range(number: float, label: str, notes: LabelNotes | None, original: Any) -> float | None:
    """`number` when it lies in the task's `valid_range`, else None with an `out_of_range` note."""
    task = TASKS[label]
    low, high = task.valid_range
    if low <= number <= high:
        return number
    return _unusable(notes, label, "out_of_range", f"{label} {_shown(original)} is outside the possible "
                     f"{low:g}-{high:g} {task.unit}")


def parse_age(value: Any, notes: LabelNotes | None = None, over_89_code: float | None = None) -> float | None:
    """Age in years from a number or text that is one (`78`, `"78"`, `">89"`); `None` when missing (`"NaN"`) or
    unusable (see the module docstring: the reason is appended to `notes`).

    Args:
        notes: list to append a `{"label", "reason", "detail"}` note to for a present but unusable value.
        over_89_code: the source's code for "older than 89", stored as 90 (PTB-XL: 300). Other sources have none:
            their 300 is out of range.
    """
    if is_missing(value):
        return None
    text = value.strip() if isinstance(value, str) else value
    older = isinstance(text, str) and text.startswith(">")  # ">89": the youngest age it allows, 90
    age = _number(text[1:] if older else text, "age", notes, value)
    if age is None:
        return None
    if over_89_code is not None and age == over_89_code:
        return 90.0
    return _in_range(age + 1.0 if older else age, "age", notes, value)


def parse_sex(value: Any, numeric: tuple[str, str] = SEX_LABELS, notes: LabelNotes | None = None) -> int | None:
    """Sex index (0 = female, 1 = male) from `"F"`, `"Female"`, `"M"`, `"male"`...; another value is missing, with an
    `unknown_value` note in `notes`.

    `numeric` names what 0 and 1 mean in the source when it stores numbers: ours by default; PTB-XL stores
    0 = male, 1 = female, so its loader passes `("male", "female")`.
    """
    if is_missing(value):
        return None
    text = str(value).strip().lower()
    if text in ("0", "1", "0.0", "1.0"):
        return SEX_LABELS.index(numeric[int(float(text))])
    if text in ("f", "female", "woman", "w"):
        return 0
    if text in ("m", "male", "man"):
        return 1
    return _unusable(notes, "sex", "unknown_value", f"sex {_shown(value)} is none of F/female/M/male/0/1")


def parse_potassium_flag(value: Any, notes: LabelNotes | None = None) -> int | None:
    """Potassium flag (0 = normal, 1 = abnormal) from 0/1, `"normal"`/`"abnormal"` or MIMIC-IV lab flags; another
    value is missing, with an `unknown_value` note in `notes`."""
    if is_missing(value):
        return None
    text = str(value).strip().lower()
    if text in ("0", "0.0", "normal", "false"):
        return 0
    if text in ("1", "1.0", "abnormal", "true", "high", "low", "delta"):
        return 1
    return _unusable(notes, "potassium_flag", "unknown_value",
                     f"potassium_flag {_shown(value)} is none of 0/1/normal/abnormal/high/low/delta")


def parse_float(value: Any, placeholders: tuple[float, ...] = (), label: str | None = None,
                notes: LabelNotes | None = None) -> float | None:
    """A float, or `None` for missing values and the source's placeholders (e.g. MIMIC-IV-ECG's 29999).

    With `label` (a task of `TASKS` with a `valid_range`, e.g. `"rr_interval"`), a value that is not a number or lies
    outside the range is `None` too, with its reason appended to `notes`."""
    if is_missing(value):
        return None
    number = _number(value, label or "value", notes if label else None)
    if number is None or number in placeholders:
        return None
    if label is not None and TASKS[label].valid_range is not None:
        return _in_range(number, label, notes, value)
    return number


__all__ = [
    "ARRHYTHMIA_CLASSES",
    "SEX_LABELS",
    "POTASSIUM_LABELS",
    "LABEL_COLUMNS",
    "RHYTHM_PRIORITY",
    "SNOMED_RHYTHMS",
    "SCP_RHYTHMS",
    "TEXT_RHYTHMS",
    "arrhythmia_from_snomed",
    "arrhythmia_from_scp",
    "arrhythmia_from_text",
    "parse_age",
    "parse_sex",
    "parse_potassium_flag",
    "parse_float",
    "is_missing",
]
