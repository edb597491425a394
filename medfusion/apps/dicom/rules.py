"""Map the series of a DICOM study to the model's modalities by configurable rules.

Scanners name series by protocol ("AX T2 FLAIR", "t1_mprage_sag_p2_iso POST", "Ax T1 +C", "tirm_tra_dark-fluid"),
not by BraTS modality. A :class:`SeriesRule` matches a series when

* at least one of its ``include`` regular expressions (case-insensitive) is found in the series' text (the attributes
  in :data:`TEXT_FIELDS`: SeriesDescription, ProtocolName, SequenceName, joined by ``" | "``), when it has any;
* none of its ``exclude`` expressions is found;
* every ``where`` condition on acquisition attributes holds (``{"InversionTime": [1500, null]}`` = at least 1500,
  ``{"ScanningSequence": "IR"}`` = the value contains "IR");
* its ``contrast`` condition holds: ``"required"`` = a contrast keyword in the text or a non-empty
  ContrastBolusAgent (0018,0010); ``"forbidden"`` = neither; ``"any"``.

Rules are tried in order and the first match wins, so the specific ones (T1 post-contrast) come before the general
ones (T1). Series that are not MR images (SEG, SR, PR ... including our own earlier results) or that match an
``ignore`` pattern (localizers, diffusion, perfusion, ...) are reported as unmatched with the reason. When several
series match one modality, one is used (original before derived, then the most slices, then the latest series
number) and the others are reported. The defaults (:func:`default_rules`) cover common Siemens/GE/Philips names;
a JSON file with the same structure replaces them (``medfusion dicom-segment --rules rules.json``)::

    {"rules": [{"modality": "t1ce", "include": ["t1.*(post|gd)"], "contrast": "any"}, ...],
     "ignore": ["localizer", "scout"]}
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "TEXT_FIELDS",
    "SeriesInfo",
    "SeriesRule",
    "RuleSet",
    "SeriesMapping",
    "default_rules",
    "load_rules",
    "map_series",
]

#: Attributes whose values form the text the regular expressions are matched against.
TEXT_FIELDS: tuple[str, ...] = ("SeriesDescription", "ProtocolName", "SequenceName")
_CONTRAST_VALUES = ("required", "forbidden", "any")

# "(?<![a-z0-9])" / "(?![a-z0-9])": word boundaries that also split on "_", "-", "+" (scanner names use them all).
_B, _E = r"(?<![a-z0-9])", r"(?![a-z0-9])"
_CONTRAST_TEXT = (
    rf"{_B}(?:post|gd|gad\w*|gado\w*|contrast|ce|c|t1c|t1ce|t1gd|enh\w*|dotarem|gadavist|magnevist|multihance)"
    rf"{_E}|\+\s*c{_E}|{_B}c\+|\+\s*gd"
)
# "T1 pre gad", "T1 non-contrast", "T1 w/o": a contrast word that says there was none
_NO_CONTRAST_TEXT = (
    rf"{_B}pre{_E}|{_B}pre[ _-]?(?:contrast|gd|gad\w*|c){_E}|{_B}non[ _-]?(?:contrast|con|gd){_E}|w/o|without"
)


@dataclass(frozen=True)
class SeriesInfo:
    """What the rules look at in one series (from QIDO-RS or a file header).

    Attributes:
        series_uid: SeriesInstanceUID.
        modality: DICOM Modality (MR, CT, SEG, SR, ...).
        description: SeriesDescription.
        protocol: ProtocolName.
        sequence: SequenceName.
        number: SeriesNumber (``None`` when absent).
        instances: number of instances (slices) in the series.
        attributes: further attributes by keyword (ScanningSequence, EchoTime, ImageType, ContrastBolusAgent, ...).
    """

    series_uid: str
    modality: str = ""
    description: str = ""
    protocol: str = ""
    sequence: str = ""
    number: int | None = None
    instances: int = 0
    attributes: Mapping[str, Any] = field(default_factory=dict)

    def text(self, fields: Sequence[str] = TEXT_FIELDS) -> str:
        """The lower-cased text the rules search (the non-empty ``fields`` joined by ``" | "``)."""
        values = {
            "SeriesDescription": self.description,
            "ProtocolName": self.protocol,
            "SequenceName": self.sequence,
        }
        parts = [str(values.get(f, self.attributes.get(f, "")) or "") for f in fields]
        return " | ".join(p for p in parts if p).lower()

    def label(self) -> str:
        """Short human-readable name: ``#3 "AX T1 +C" (1.2.3...)``."""
        num = f"#{self.number} " if self.number is not None else ""
        return f'{num}"{self.description or self.protocol or "?"}" ({self.series_uid})'

    @property
    def derived(self) -> bool:
        """ImageType says DERIVED (reformats, MIPs, subtractions)."""
        image_type: str | Sequence[Any] = self.attributes.get("ImageType") or ()
        if isinstance(image_type, str):
            image_type = image_type.split("\\")
        return bool(image_type) and str(image_type[0]).upper() == "DERIVED"


@dataclass(frozen=True)
class SeriesRule:
    """One rule: series that match it hold ``modality``.

    Args:
        modality: model modality name (``"t1ce"``).
        include: regular expressions; one must be found in the series text (none given = no text condition).
        exclude: regular expressions that veto the rule.
        where: ``{attribute: [min, max]}`` (numbers, either bound may be ``None``) or ``{attribute: "substring"}``.
        contrast: ``"required"``, ``"forbidden"`` or ``"any"`` (see the module docstring).
        name: shown in the mapping report (default: ``modality`` + the rule's position).
    """

    modality: str
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    where: Mapping[str, Any] = field(default_factory=dict)
    contrast: str = "any"
    name: str = ""

    def __post_init__(self) -> None:
        if self.contrast not in _CONTRAST_VALUES:
            raise ValueError(
                f"rule for {self.modality!r}: contrast must be one of {_CONTRAST_VALUES}, got {self.contrast!r}."
            )
        if not self.include and not self.where:
            raise ValueError(f"rule for {self.modality!r}: give 'include' patterns, 'where' conditions or both.")
        for pattern in (*self.include, *self.exclude):
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(
                    f"rule for {self.modality!r}: invalid regular expression {pattern!r} ({err})."
                ) from None
        for key, cond in self.where.items():
            ok = isinstance(cond, str) or (
                isinstance(cond, Sequence)
                and len(cond) == 2
                and all(b is None or isinstance(b, (int, float)) for b in cond)
            )
            if not ok:
                raise ValueError(
                    f"rule for {self.modality!r}: where[{key!r}] must be a substring or [min, max] (numbers or null), "
                    f"got {cond!r}."
                )

    def matches(self, series: SeriesInfo, fields: Sequence[str] = TEXT_FIELDS) -> bool:
        """Whether ``series`` satisfies every condition of the rule."""
        text = series.text(fields)
        if self.include and not any(re.search(p, text, re.IGNORECASE) for p in self.include):
            return False
        if any(re.search(p, text, re.IGNORECASE) for p in self.exclude):
            return False
        for key, cond in self.where.items():
            if not _condition(series.attributes.get(key), cond):
                return False
        if self.contrast != "any":
            agent = str(series.attributes.get("ContrastBolusAgent") or "").strip()
            said = re.search(_CONTRAST_TEXT, text, re.IGNORECASE) and not re.search(
                _NO_CONTRAST_TEXT, text, re.IGNORECASE
            )
            has = bool(agent) or bool(said)
            if has != (self.contrast == "required"):
                return False
        return True


def _condition(value: Any, cond: Any) -> bool:
    if value is None or value == "":
        return False
    if isinstance(cond, str):
        text = "\\".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)
        return cond.lower() in text.lower()
    try:
        number = float(value[0] if isinstance(value, (list, tuple)) else value)
    except (TypeError, ValueError, IndexError):
        return False
    low, high = cond
    return (low is None or number >= low) and (high is None or number <= high)


@dataclass(frozen=True)
class RuleSet:
    """Ordered rules plus the patterns of series to ignore.

    Args:
        rules: tried in order; the first match wins.
        ignore: regular expressions of series never used (localizers, diffusion, ...).
        fields: attributes forming the searched text.
    """

    rules: tuple[SeriesRule, ...]
    ignore: tuple[str, ...] = ()
    fields: tuple[str, ...] = TEXT_FIELDS

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the structure :func:`load_rules` reads)."""
        return {
            "rules": [{k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(r).items()} for r in self.rules],
            "ignore": list(self.ignore),
            "fields": list(self.fields),
        }


def default_rules() -> RuleSet:
    """Rules for common scanner names of FLAIR, T1, T1 post-contrast (``t1ce``) and T2 (BraTS modalities).

    Text rules first (T1 post-contrast before T1, FLAIR before T2 because "T2 FLAIR" names both), then
    acquisition-parameter fallbacks for series whose names say nothing: inversion recovery with a long inversion
    time = FLAIR, long TE/TR without inversion = T2, short TE/TR = T1 (post-contrast when ContrastBolusAgent is set).
    """
    t1 = rf"{_B}s?t1(?:w|wi)?(?![0-9])|mprage|{_B}spgr|fspgr|bravo|tfl3d|{_B}vibe{_E}|{_B}ffe{_E}|{_B}tse[_ ]?t1"
    flair = rf"flair|dark[ _-]?fluid|{_B}tirm|{_B}t2[ _-]?fl{_E}"
    t2 = rf"{_B}t2(?:w|wi)?(?![0-9*])"
    not_t2 = (rf"t2\s*\*|t2star|{_B}(?:swi|gre|ffe|haste){_E}",)
    return RuleSet(
        rules=(
            SeriesRule("t1ce", include=(t1,), contrast="required", name="t1ce: T1 name + contrast"),
            SeriesRule("t1", include=(t1,), contrast="forbidden", name="t1: T1 name"),
            SeriesRule("flair", include=(flair,), name="flair: FLAIR name"),
            SeriesRule("t2", include=(t2,), exclude=not_t2, name="t2: T2 name"),
            SeriesRule(
                "flair",
                where={"ScanningSequence": "IR", "InversionTime": [1500, None], "EchoTime": [60, None]},
                name="flair: IR, TI >= 1500 ms, TE >= 60 ms",
            ),
            SeriesRule(
                "t2",
                where={"EchoTime": [70, None], "RepetitionTime": [2000, None], "InversionTime": [None, 300]},
                name="t2: TE >= 70 ms, TR >= 2000 ms, no long inversion",
            ),
            SeriesRule(
                "t2",
                where={"EchoTime": [70, None], "RepetitionTime": [2000, None], "ScanningSequence": "SE"},
                name="t2: spin echo, TE >= 70 ms, TR >= 2000 ms",
            ),
            SeriesRule(
                "t1ce",
                where={"EchoTime": [None, 30], "RepetitionTime": [None, 1000]},
                contrast="required",
                name="t1ce: TE <= 30 ms, TR <= 1000 ms, contrast agent",
            ),
            SeriesRule(
                "t1",
                where={"EchoTime": [None, 30], "RepetitionTime": [None, 1000]},
                contrast="forbidden",
                name="t1: TE <= 30 ms, TR <= 1000 ms, no contrast",
            ),
        ),
        ignore=(
            rf"locali[sz]er|{_B}loc{_E}|scout|survey|3[ _-]?plane|tri[ _-]?pilot|{_B}cal(?:ibration)?{_E}|asset|"
            rf"{_B}dwi{_E}|diffusion|{_B}dti{_E}|{_B}adc{_E}|{_B}trace{_E}|{_B}ep2d_diff|perfusion|{_B}dsc{_E}|"
            rf"{_B}dce{_E}|{_B}pwi{_E}|{_B}asl{_E}|{_B}swi{_E}|{_B}mip{_E}|subtract|{_B}sub{_E}|spectro|{_B}mrs{_E}|"
            rf"{_B}mosaic{_E}|{_B}phase{_E}|{_B}pha{_E}",
        ),
    )


def load_rules(path: str | os.PathLike | None) -> RuleSet:
    """Read a rules JSON file (``None`` = :func:`default_rules`).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: not JSON, or a rule is malformed (the message names the file and the rule).
    """
    if path is None:
        return default_rules()
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"series rules file {p} does not exist.")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"series rules file {p} is not valid JSON ({err}).") from None
    if not isinstance(data, Mapping) or not isinstance(data.get("rules"), list) or not data["rules"]:
        raise ValueError(f"series rules file {p}: expected {{'rules': [...], 'ignore': [...]}} with at least one rule.")
    rules = []
    known = {"modality", "include", "exclude", "where", "contrast", "name"}
    for i, item in enumerate(data["rules"]):
        if not isinstance(item, Mapping) or "modality" not in item or set(item) - known:
            raise ValueError(
                f"series rules file {p}: rule {i} must be an object with 'modality' and any of "
                f"{sorted(known - {'modality'})}, got {item!r}."
            )
        try:
            rules.append(
                SeriesRule(
                    modality=str(item["modality"]),
                    include=tuple(_strings(item.get("include", []), p, i, "include")),
                    exclude=tuple(_strings(item.get("exclude", []), p, i, "exclude")),
                    where=dict(item.get("where", {})),
                    contrast=str(item.get("contrast", "any")),
                    name=str(item.get("name", "")),
                )
            )
        except ValueError as err:
            raise ValueError(f"series rules file {p}, rule {i}: {err}") from None
    ignore = tuple(_strings(data.get("ignore", []), p, -1, "ignore"))
    fields = tuple(_strings(data.get("fields", list(TEXT_FIELDS)), p, -1, "fields"))
    return RuleSet(rules=tuple(rules), ignore=ignore, fields=fields)


def _strings(value: Any, path: Path, index: int, key: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        where = f"rule {index}" if index >= 0 else "top level"
        raise ValueError(f"series rules file {path}, {where}: {key!r} must be a list of strings, got {value!r}.")
    return value


@dataclass
class SeriesMapping:
    """Result of :func:`map_series`.

    Attributes:
        used: modality -> the series used for it.
        rule: modality -> the name of the rule that matched the used series.
        unmatched: ``(series, reason)`` for every series not used (no rule, ignored, not MR, duplicate).
        modalities: the model's modality order.
    """

    used: dict[str, SeriesInfo]
    rule: dict[str, str]
    unmatched: list[tuple[SeriesInfo, str]]
    modalities: tuple[str, ...]

    @property
    def present(self) -> tuple[str, ...]:
        """Present modalities in the model's order."""
        return tuple(m for m in self.modalities if m in self.used)

    @property
    def missing(self) -> tuple[str, ...]:
        """Missing modalities in the model's order."""
        return tuple(m for m in self.modalities if m not in self.used)

    def report(self) -> dict[str, Any]:
        """JSON-ready report (what the sidecar stores)."""
        return {
            "used": {
                m: {
                    "series_uid": s.series_uid,
                    "series_number": s.number,
                    "description": s.description,
                    "protocol": s.protocol,
                    "instances": s.instances,
                    "rule": self.rule[m],
                }
                for m, s in ((m, self.used[m]) for m in self.present)
            },
            "missing": list(self.missing),
            "unmatched": [
                {"series_uid": s.series_uid, "series_number": s.number, "description": s.description, "reason": r}
                for s, r in self.unmatched
            ],
        }

    def to_text(self) -> str:
        """Readable multi-line report."""
        lines = [f"  {m:6s} <- {self.used[m].label()} [{self.rule[m]}]" for m in self.present]
        lines += [f"  {m:6s} <- (no series: missing modality)" for m in self.missing]
        lines += [f"  unused    {s.label()}: {r}" for s, r in self.unmatched]
        return "\n".join(lines)


def map_series(series: Sequence[SeriesInfo], modalities: Sequence[str], rules: RuleSet | None = None) -> SeriesMapping:
    """Assign series to modalities.

    Args:
        series: every series of the study.
        modalities: the model's modalities (rules for other names are ignored).
        rules: default :func:`default_rules`.

    Returns:
        The mapping; a modality without a series is missing (no error here: the caller decides whether any is left).
    """
    rules = rules or default_rules()
    mods = tuple(modalities)
    candidates: dict[str, list[tuple[SeriesInfo, str]]] = {m: [] for m in mods}
    unmatched: list[tuple[SeriesInfo, str]] = []
    for s in series:
        if s.modality and s.modality.upper() != "MR":
            unmatched.append((s, f"not an MR image series (Modality {s.modality})"))
            continue
        text = s.text(rules.fields)
        hit = next((p for p in rules.ignore if re.search(p, text, re.IGNORECASE)), None)
        if hit is not None:
            match = re.search(hit, text, re.IGNORECASE)
            unmatched.append((s, f"ignored ({match.group(0) if match else hit!r} is not a structural series)"))
            continue
        for i, rule in enumerate(rules.rules):
            if rule.modality in mods and rule.matches(s, rules.fields):
                candidates[rule.modality].append((s, rule.name or f"{rule.modality} rule {i}"))
                break
        else:
            unmatched.append((s, f"no rule matched {text!r}" if text else "no rule matched (no description)"))
    used: dict[str, SeriesInfo] = {}
    rule_names: dict[str, str] = {}
    for m, found in candidates.items():
        if not found:
            continue
        # original before derived (reformats), then most slices, then the latest acquisition
        ranked = sorted(found, key=lambda c: (not c[0].derived, c[0].instances, c[0].number or 0), reverse=True)
        used[m], rule_names[m] = ranked[0]
        for s, _ in ranked[1:]:
            unmatched.append((s, f"also matches {m}; {used[m].label()} was preferred (original, more slices, later)"))
    return SeriesMapping(used=used, rule=rule_names, unmatched=unmatched, modalities=mods)
