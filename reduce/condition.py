"""Condition files: one model, one prompt set, one target, and how to record, ablate and fit.

:func:`load_condition` reads a TOML file and validates all of it before anything runs: syntax,
unknown keys (with the closest known key suggested), types (a boolean is never an integer),
required fields, enumerations, template slots and prompt files. Every failure is a
:class:`~reduce.errors.ReduceError` naming the file and the dotted key. Relative paths resolve
against the condition file's folder and are stored absolute, so :meth:`Condition.to_toml`
writes a copy that works from any directory (the run directory keeps one).

:func:`resolve` adds what needs the model: sites and units that exist, one-token answers,
counterfactuals of equal length, target positions inside every prompt, a language-model head
for logit targets.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import re
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .errors import ReduceError
from .prompts import PROMPT_KEYS, PromptSet, read_prompt_file, template_fields
from .sites import Site, all_site_names

DTYPES = ("float32", "float16", "bfloat16", "float64")
TARGET_KINDS = ("neuron", "logit", "logit_diff")
BASELINES = ("zero", "mean", "peak", "peak_naive", "resample_characters", "resample_tokens", "resample_generated", "resample_counterfactual")
DEFAULT_BASELINES = ("zero", "mean", "peak", "resample_tokens", "resample_counterfactual")
PLANS = ("random", "groups", "single", "circuit")
FAMILIES = ("bernoulli", "gaussian", "poisson")
# Names the recorded dataset already uses for its own coordinates and variables.
RESERVED_LABELS = frozenset({*PROMPT_KEYS, "prompt", "pos", "unit", "head", "d_head", "tokens", "length", "answer_id", "wrong_id", "token_start", "token_end", "target", "target_mask"})
_NAME = re.compile(r"[a-z0-9_-]+")
_LABEL = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DEVICE = re.compile(r"(cpu|cuda|mps|xpu|hpu|npu)(:\d+)?")
# The hub's rule for repository ids (minilm's names follow it too): [owner/]name of letters,
# digits, '-', '_' and '.', at most 96 characters each.
_HUB_ID = re.compile(r"(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}")
_REQUIRED = object()


@dataclass(frozen=True)
class ModelSpec:
    name: str
    device: str = "cpu"
    dtype: str = "float32"
    trust_remote_code: bool = False
    allow_pickle: bool = False
    device_map: str = ""


@dataclass(frozen=True)
class PromptSpec:
    """Exactly one of ``template`` (with ``slots``) or ``file``.

    ``slots`` maps each slot to its values, each a table of strings with a ``text`` key.
    """

    template: str | None = None
    file: Path | None = None
    answer: str | None = None
    wrong: str | None = None
    counterfactual: str | None = None
    max_prompts: int | None = None
    slots: dict[str, tuple[dict[str, str], ...]] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TargetSpec:
    kind: str
    position: str | int = "last"
    site: str | None = None
    unit: int | None = None


@dataclass(frozen=True)
class RecordSpec:
    sites: tuple[str, ...] = ("blocks.*.mlp.hook_post", "blocks.*.attn.hook_z")
    batch_size: int = 64
    bins: int = 256


@dataclass(frozen=True)
class AblationSpec:
    baselines: tuple[str, ...] = DEFAULT_BASELINES
    peak: str = "refined"
    plans: tuple[str, ...] = PLANS
    fractions: tuple[float, ...] = tuple(i / 10 for i in range(11))
    seeds: tuple[int, ...] = (0, 1, 2)
    eval_text: str = "zoo"
    max_eval_sequences: int = 64


@dataclass(frozen=True)
class FitSpec:
    family: str = "bernoulli"
    threshold: float | str = "auto"
    deviation_from: str = "peak"
    max_lag: int = 8
    history_lags: int = 4
    sign: str = "gradient"
    weights: str = "gradient"
    spatial_basis: int = 4
    temporal_basis: int = 6
    separable: bool = True
    test_fraction: float = 0.25
    folds: int = 5
    bootstrap: int = 100


SECTIONS = ("model", "prompts", "target", "record", "ablation", "fit")


@dataclass(frozen=True)
class Condition:
    name: str
    model: ModelSpec
    prompts: PromptSpec
    target: TargetSpec
    record: RecordSpec = RecordSpec()
    ablation: AblationSpec = AblationSpec()
    fit: FitSpec = FitSpec()
    description: str = ""
    seed: int = 0
    path: Path | None = None  # the file it was read from; errors name it

    def to_dict(self) -> dict[str, Any]:
        """The condition as TOML-shaped data (absolute paths; keys without a value left out)."""
        data: dict[str, Any] = {"name": self.name, "description": self.description, "seed": self.seed}
        for section in SECTIONS:
            data[section] = _plain(asdict(getattr(self, section)))
        prompts = data["prompts"]
        prompts["slots"] = {name: [v["text"] if set(v) == {"text"} else v for v in values] for name, values in self.prompts.slots.items()}
        for key in ("slots", "labels"):
            if not prompts[key]:
                del prompts[key]
        return data

    def to_toml(self) -> str:
        return dumps_toml(self.to_dict())

    def fingerprint(self, *sections: str) -> str:
        """A stable hash of the named sections, for stage resumption (``store.RunDir``).

        The prompts' identity includes the seed (it picks the sample) and the contents of a
        prompt file; the ablation's includes the contents of an evaluation text file.
        """
        from .store import fingerprint

        data = self.to_dict()
        parts = []
        for section in sections:
            part = dict(data[section])
            if section == "prompts":
                part["seed"] = self.seed
                if self.prompts.file is not None:
                    part["file"] = _file_digest(self.prompts.file)
            if section == "ablation" and self.ablation.eval_text != "zoo":
                part["eval_text"] = _file_digest(Path(self.ablation.eval_text))
            parts.append({section: part})
        return fingerprint(*parts)

    def with_overrides(self, *, device: str | None = None, dtype: str | None = None) -> "Condition":
        """A copy with the model's device / dtype replaced (as the CLI's --device / --dtype do)."""
        changes = {}
        if device is not None:
            changes["device"] = _check_device(device, self.path)
        if dtype is not None:
            if dtype not in DTYPES:
                raise ReduceError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}", file=self.path, field="model.dtype")
            changes["dtype"] = dtype
        return replace(self, model=replace(self.model, **changes)) if changes else self


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Reading


def load_condition(path) -> Condition:
    """Read and validate a condition file; see ``README.md`` for the schema."""
    path = Path(path).resolve()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ReduceError("condition file does not exist", file=path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ReduceError(f"cannot read the condition file: {exc}", file=path) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line = re.search(r"line (\d+)", str(exc))
        raise ReduceError(f"invalid TOML: {exc}", file=path, field=f"line {line.group(1)}" if line else "end of file") from None
    return parse_condition(data, path)


def parse_condition(data: dict, path) -> Condition:
    """Validate TOML-shaped data as if read from ``path`` (relative paths resolve against its folder)."""
    path = Path(path).resolve()
    top = _Table(data, "", path)
    name = top.string("name", pattern=_NAME, pattern_help="lower-case letters, digits, '_' and '-'")
    description = top.string("description", Condition.description)
    seed = top.integer("seed", Condition.seed, minimum=0)
    model = _model(top.table("model"), path.parent)
    prompts = _prompts(top.table("prompts"), path.parent)
    target = _target(top.table("target"))
    record = _record(top.table("record", required=False))
    ablation = _ablation(top.table("ablation", required=False), path.parent)
    fit = _fit(top.table("fit", required=False))
    condition = Condition(name, model, prompts, target, record, ablation, fit, description, seed, path)
    return _check_across_sections(condition, explicit_baselines="baselines" in data.get("ablation", {}))


def _model(table: "_Table", base: Path) -> ModelSpec:
    name = table.string("name", pattern=re.compile(r".+"), pattern_help="a zoo:NAME, minilm, a folder or a hub id")
    spec = ModelSpec(
        name=_model_location(name, base, table),
        device=_check_device(table.string("device", ModelSpec.device), table.source),
        dtype=table.string("dtype", ModelSpec.dtype, choices=DTYPES),
        trust_remote_code=table.boolean("trust_remote_code", ModelSpec.trust_remote_code),
        allow_pickle=table.boolean("allow_pickle", ModelSpec.allow_pickle),
        device_map=table.string("device_map", ModelSpec.device_map),
    )
    return spec


def _model_location(name: str, base: Path, table: "_Table") -> str:
    """A local folder becomes an absolute path; zoo names, minilm and hub ids stay as written."""
    if name.startswith("zoo:"):
        return name
    folder = _path_in(name, base, table.source, table.key("name"), expand_user=True)
    if _is_dir(folder):
        return str(folder)
    if name.startswith(("./", "../", "/", "~")):
        raise ReduceError(f"local model folder {_shorten(str(folder))} does not exist", file=table.source, field=table.key("name"))
    if not _HUB_ID.fullmatch(name):
        raise ReduceError(f"{_shorten(name)} is neither zoo:NAME, minilm, an existing folder nor a hub id (owner/name)", file=table.source, field=table.key("name"))
    return name


def _path_in(text: str, base: Path, source, field: str, *, expand_user: bool = False) -> Path:
    """``text`` as an absolute path, relative to ``base`` (the condition's folder).

    A string that cannot name a path (a NUL byte, an unknown ``~user``) is a ReduceError, not a
    crash: a condition file is data and may hold anything.
    """
    try:
        path = Path(text).expanduser() if expand_user else Path(text)
        return (path if path.is_absolute() else base / path).resolve()
    except (OSError, ValueError, RuntimeError) as exc:
        raise ReduceError(f"{_shorten(text)} is not a usable path: {exc}", file=source, field=field) from None


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # e.g. a name too long for the file system: no such folder
        return False


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:
        return False


def _shorten(text: str, limit: int = 80) -> str:
    """``repr`` of a value for an error line, cut so one bad value cannot flood the terminal."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"


def _check_device(device: str, source) -> str:
    if not _DEVICE.fullmatch(device):
        raise ReduceError(f"device {device!r} is not a torch device such as 'cpu', 'cuda' or 'cuda:1'", file=source, field="model.device")
    return device


def _prompts(table: "_Table", base: Path) -> PromptSpec:
    template = table.string("template", None)
    file = table.string("file", None)
    if (template is None) == (file is None):
        raise ReduceError("give exactly one of prompts.template or prompts.file", file=table.source, field="prompts")
    per_prompt = {key: table.string(key, None) for key in ("answer", "wrong", "counterfactual")}
    max_prompts = table.integer("max_prompts", None, minimum=1)
    if file is not None:
        for key in ("answer", "wrong", "counterfactual", "slots", "labels"):
            if table.has(key):
                raise ReduceError(f"with prompts.file, {key} comes from the file (a .jsonl key per record)", file=table.source, field=table.key(key))
        prompt_file = _path_in(file, base, table.source, "prompts.file")
        read_prompt_file(prompt_file, source=table.source, field="prompts.file")
        return PromptSpec(file=prompt_file, max_prompts=max_prompts)
    slots = _slots(table.table("slots", required=False))
    labels_table = table.table("labels", required=False)
    labels = {}
    for label in labels_table.keys():
        if not _LABEL.fullmatch(label) or label in RESERVED_LABELS:
            raise ReduceError(
                f"label {label!r} must be a name of letters, digits and '_' other than {', '.join(sorted(RESERVED_LABELS))}",
                file=table.source,
                field=labels_table.key(label),
            )
        labels[label] = labels_table.string(label)
    templates = {"prompts.template": template, **{f"prompts.{k}": v for k, v in per_prompt.items() if v is not None}}
    templates.update({f"prompts.labels.{k}": v for k, v in labels.items()})
    used = set()
    for where, text in templates.items():
        for slot, slot_field in template_fields(text, source=table.source, field=where):
            if slot not in slots:
                known = _suggest(slot, slots)
                raise ReduceError(f"template uses slot {{{slot}}} but [prompts.slots] does not define it{known}", file=table.source, field=where)
            lacking = [v["text"] for v in slots[slot] if slot_field not in v]
            if lacking:
                raise ReduceError(f"{{{slot}.{slot_field}}}: the value {lacking[0]!r} of slot {slot!r} has no field {slot_field!r}", file=table.source, field=where)
            used.add(slot)
    for slot in slots:
        if slot not in used:
            raise ReduceError(f"slot {slot!r} is defined but no template uses it", file=table.source, field=f"prompts.slots.{slot}")
    if not template.strip():
        raise ReduceError("the template is empty", file=table.source, field="prompts.template")
    return PromptSpec(template=template, max_prompts=max_prompts, slots=slots, labels=labels, **per_prompt)


def _slots(table: "_Table") -> dict[str, tuple[dict[str, str], ...]]:
    slots = {}
    for slot in table.keys():
        where = table.key(slot)
        if not _LABEL.fullmatch(slot):
            raise ReduceError(f"slot name {slot!r} must be letters, digits and '_' (not starting with a digit)", file=table.source, field=where)
        values = table.raw(slot)
        if not isinstance(values, list):
            raise ReduceError(f"expected an array of strings or of tables with 'text', got {_describe(values)}", file=table.source, field=where)
        if not values:
            raise ReduceError("a slot needs at least one value (an empty slot makes no prompts)", file=table.source, field=where)
        slots[slot] = tuple(_slot_value(value, f"{where}[{i}]", table.source) for i, value in enumerate(values))
    return slots


def _slot_value(value, where: str, source) -> dict[str, str]:
    if isinstance(value, str):
        return {"text": value}
    if not isinstance(value, dict):
        raise ReduceError(f"expected a string or a table with 'text', got {_describe(value)}", file=source, field=where)
    if "text" not in value:
        raise ReduceError("a slot table needs a 'text' field", file=source, field=f"{where}.text")
    for key, item in value.items():
        if not isinstance(item, str):
            raise ReduceError(f"expected a string, got {_describe(item)}", file=source, field=f"{where}.{key}")
    return dict(value)


def _target(table: "_Table") -> TargetSpec:
    kind = table.string("kind", choices=TARGET_KINDS)
    position = table.raw("position", TargetSpec.position)
    if not (position in ("last", "all") or (isinstance(position, int) and not isinstance(position, bool))):
        raise ReduceError(f"expected \"last\", \"all\" or an integer token index, got {_describe(position)}", file=table.source, field="target.position")
    site = table.string("site", None)
    unit = table.integer("unit", None, minimum=0)
    if kind == "neuron":
        if site is None or unit is None:
            missing = "site" if site is None else "unit"
            raise ReduceError("a neuron target needs target.site and target.unit", file=table.source, field=f"target.{missing}")
        Site.parse(site, source=table.source, field="target.site")
    else:
        for key, value in (("site", site), ("unit", unit)):
            if value is not None:
                raise ReduceError(f"only neuron targets take a {key} (this target is {kind!r})", file=table.source, field=f"target.{key}")
    return TargetSpec(kind, position, site, unit)


def _record(table: "_Table") -> RecordSpec:
    sites = table.strings("sites", RecordSpec.sites, nonempty=True)
    for pattern in sites:
        _check_site_pattern(pattern, table.source)
    bins = table.integer("bins", RecordSpec.bins, minimum=4)
    if bins % 2:
        raise ReduceError(f"bins must be even (histograms grow by merging pairs of bins), got {bins}", file=table.source, field="record.bins")
    spec = RecordSpec(sites=sites, batch_size=table.integer("batch_size", RecordSpec.batch_size, minimum=1), bins=bins)
    return spec


def _check_site_pattern(pattern: str, source) -> None:
    """A pattern must be able to match some site of some model (layers are checked by resolve)."""
    import fnmatch

    if any(ch in pattern for ch in "*?["):
        if not any(fnmatch.fnmatchcase(name, pattern) for name in all_site_names(1000)):
            raise ReduceError(
                f"site pattern {pattern!r} matches no site name (blocks.L.mlp.hook_post, blocks.L.attn.hook_z, blocks.L.hook_resid_pre, blocks.L.hook_resid_post)",
                file=source,
                field="record.sites",
            )
    else:
        Site.parse(pattern, source=source, field="record.sites")


def _ablation(table: "_Table", base: Path) -> AblationSpec:
    eval_text = table.string("eval_text", AblationSpec.eval_text)
    if eval_text != "zoo":
        text_file = _path_in(eval_text, base, table.source, "ablation.eval_text")
        if text_file.suffix != ".txt" or not _is_file(text_file):
            raise ReduceError(f"eval_text must be \"zoo\" or an existing .txt file; {str(text_file)!r} is not", file=table.source, field="ablation.eval_text")
        eval_text = str(text_file)
    spec = AblationSpec(
        baselines=table.strings("baselines", AblationSpec.baselines, choices=BASELINES, nonempty=True),
        peak=table.string("peak", AblationSpec.peak, choices=("refined", "naive")),
        plans=table.strings("plans", AblationSpec.plans, choices=PLANS, nonempty=True),
        fractions=table.numbers("fractions", AblationSpec.fractions, minimum=0.0, maximum=1.0),
        seeds=table.integers("seeds", AblationSpec.seeds, minimum=0),
        eval_text=eval_text,
        max_eval_sequences=table.integer("max_eval_sequences", AblationSpec.max_eval_sequences, minimum=1),
    )
    return spec


def _fit(table: "_Table") -> FitSpec:
    threshold = table.raw("threshold", FitSpec.threshold)
    if threshold != "auto" and (isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold)):
        raise ReduceError(f"expected a number or \"auto\", got {_describe(threshold)}", file=table.source, field="fit.threshold")
    spec = FitSpec(
        family=table.string("family", FitSpec.family, choices=FAMILIES),
        threshold=float(threshold) if threshold != "auto" else threshold,
        deviation_from=table.string("deviation_from", FitSpec.deviation_from, choices=("peak", "mean", "zero")),
        max_lag=table.integer("max_lag", FitSpec.max_lag, minimum=0),
        history_lags=table.integer("history_lags", FitSpec.history_lags, minimum=0),
        sign=table.string("sign", FitSpec.sign, choices=("gradient", "correlation")),
        weights=table.string("weights", FitSpec.weights, choices=("gradient", "none")),
        spatial_basis=table.integer("spatial_basis", FitSpec.spatial_basis, minimum=0),
        temporal_basis=table.integer("temporal_basis", FitSpec.temporal_basis, minimum=0),
        separable=table.boolean("separable", FitSpec.separable),
        test_fraction=table.number("test_fraction", FitSpec.test_fraction, minimum=0.0, maximum=1.0, exclusive=True),
        folds=table.integer("folds", FitSpec.folds, minimum=2),
        bootstrap=table.integer("bootstrap", FitSpec.bootstrap, minimum=0),
    )
    return spec


def _check_across_sections(condition: Condition, explicit_baselines: bool) -> Condition:
    """Checks that span sections; without counterfactual pairs, the default baselines drop the
    counterfactual resample (naming it explicitly is an error)."""
    source, prompts = condition.path, condition.prompts
    if prompts.file is not None:
        available = set(read_prompt_file(prompts.file, source=source)[0])
        how = "give every record of the prompt file a {!r} key"
    else:
        available = {key for key in PROMPT_KEYS if key == "text" or getattr(prompts, key) is not None}
        how = "set prompts.{}"
    kind = condition.target.kind
    for key in {"logit": ("answer",), "logit_diff": ("answer", "wrong")}.get(kind, ()):
        if key not in available:
            raise ReduceError(f"a {kind} target needs each prompt's {key}: {how.format(key)}", file=source, field="target.kind")
    baselines = condition.ablation.baselines
    if "resample_counterfactual" in baselines and "counterfactual" not in available:
        if explicit_baselines:
            raise ReduceError(
                f"the resample_counterfactual baseline needs paired prompts: {how.format('counterfactual')}, or drop the baseline",
                file=source,
                field="ablation.baselines",
            )
        kept = tuple(b for b in baselines if b != "resample_counterfactual")
        condition = replace(condition, ablation=replace(condition.ablation, baselines=kept))
    return condition


# ---------------------------------------------------------------------------------------------
# Typed access to one TOML table. Unknown keys are reported on entry, before any missing or
# mistyped one, so a misspelt key is named as such rather than as a missing field.


class _Table:
    def __init__(self, data: dict, prefix: str, source: Path):
        self.data, self.prefix, self.source = data, prefix, source
        known = _KNOWN_KEYS.get(prefix)
        for name in data if known is not None else ():
            if name not in known:
                raise ReduceError(f"unknown key {name!r}{_suggest(name, known)}", file=source, field=self.key(name))

    def key(self, name: str) -> str:
        return f"{self.prefix}{_toml_key(name)}"  # quoted as in TOML when not bare (e.g. an empty key)

    def has(self, name: str) -> bool:
        return name in self.data

    def keys(self) -> list[str]:
        return list(self.data)

    def raw(self, name: str, default=_REQUIRED):
        if name in self.data:
            return self.data[name]
        if default is _REQUIRED:
            raise ReduceError("required field is missing", file=self.source, field=self.key(name))
        return default

    def table(self, name: str, *, required: bool = True) -> "_Table":
        value = self.raw(name, _REQUIRED if required else {})
        if not isinstance(value, dict):
            raise ReduceError(f"expected a table ([{self.key(name)}]), got {_describe(value)}", file=self.source, field=self.key(name))
        return _Table(value, f"{self.key(name)}.", self.source)

    def _typed(self, name, default, accepts, expected):
        value = self.raw(name, default)
        if name in self.data and not accepts(value):
            raise ReduceError(f"expected {expected}, got {_describe(value)}", file=self.source, field=self.key(name))
        return value

    def string(self, name, default=_REQUIRED, *, choices=None, pattern=None, pattern_help=""):
        value = self._typed(name, default, lambda v: isinstance(v, str), "a string")
        if name in self.data and choices is not None and value not in choices:
            raise ReduceError(f"{value!r} is not one of {', '.join(choices)}{_suggest(value, choices)}", file=self.source, field=self.key(name))
        if name in self.data and pattern is not None and not pattern.fullmatch(value):
            raise ReduceError(f"{value!r} is not valid: use {pattern_help}", file=self.source, field=self.key(name))
        return value

    def boolean(self, name, default=_REQUIRED):
        return self._typed(name, default, lambda v: isinstance(v, bool), "true or false")

    def integer(self, name, default=_REQUIRED, *, minimum=None):
        value = self._typed(name, default, _is_integer, "an integer")
        if name in self.data:
            _check_range(value, minimum, None, False, self.source, self.key(name))
        return value

    def number(self, name, default=_REQUIRED, *, minimum=None, maximum=None, exclusive=False):
        value = self._typed(name, default, _is_number, "a number")
        if name in self.data:
            _check_range(value, minimum, maximum, exclusive, self.source, self.key(name))
        return float(value)

    def _array(self, name, default, accepts, expected, nonempty) -> tuple:
        value = self.raw(name, default)
        if name not in self.data:
            return tuple(value)
        if not isinstance(value, list):
            raise ReduceError(f"expected an array of {expected}, got {_describe(value)}", file=self.source, field=self.key(name))
        if nonempty and not value:
            raise ReduceError("the array must not be empty", file=self.source, field=self.key(name))
        for i, item in enumerate(value):
            if not accepts(item):
                raise ReduceError(f"expected {expected}, got {_describe(item)}", file=self.source, field=f"{self.key(name)}[{i}]")
        return tuple(value)

    def strings(self, name, default=_REQUIRED, *, choices=None, nonempty=False):
        values = self._array(name, default, lambda v: isinstance(v, str), "strings", nonempty)
        for i, value in enumerate(values):
            if choices is not None and value not in choices:
                raise ReduceError(f"{value!r} is not one of {', '.join(choices)}{_suggest(value, choices)}", file=self.source, field=f"{self.key(name)}[{i}]")
        return values

    def integers(self, name, default=_REQUIRED, *, minimum=None):
        values = self._array(name, default, _is_integer, "integers", nonempty=True)
        for i, value in enumerate(values):
            _check_range(value, minimum, None, False, self.source, f"{self.key(name)}[{i}]")
        return values

    def numbers(self, name, default=_REQUIRED, *, minimum=None, maximum=None):
        values = self._array(name, default, _is_number, "numbers", nonempty=True)
        for i, value in enumerate(values):
            _check_range(value, minimum, maximum, False, self.source, f"{self.key(name)}[{i}]")
        return tuple(float(v) for v in values)


def _suggest(word: str, known) -> str:
    close = difflib.get_close_matches(word, list(known), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_range(value, minimum, maximum, exclusive, source, where) -> None:
    if value != value:  # TOML has nan; no setting means anything with it, and it passes every comparison
        raise ReduceError("expected a number, got nan", file=source, field=where)
    low = minimum is not None and (value <= minimum if exclusive else value < minimum)
    high = maximum is not None and (value >= maximum if exclusive else value > maximum)
    if not (low or high):
        return
    if maximum is None:
        bound = f"must be {'more than' if exclusive else 'at least'} {minimum}"
    elif minimum is None:
        bound = f"must be {'less than' if exclusive else 'at most'} {maximum}"
    else:
        bound = f"must lie in {'(' if exclusive else '['}{minimum}, {maximum}{')' if exclusive else ']'}"
    raise ReduceError(f"{bound}, got {value}", file=source, field=where)


def _describe(value) -> str:
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int):
        return f"an integer ({value})"
    if isinstance(value, float):
        return f"a float ({value})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return type(value).__name__


_SPECS = {"model": ModelSpec, "prompts": PromptSpec, "target": TargetSpec, "record": RecordSpec, "ablation": AblationSpec, "fit": FitSpec}
_KNOWN_KEYS = {"": ["name", "description", "seed", *SECTIONS], **{f"{s}.": [f.name for f in fields(spec)] for s, spec in _SPECS.items()}}


# ---------------------------------------------------------------------------------------------
# Writing TOML (tomllib only reads)

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def dumps_toml(data: dict) -> str:
    """TOML text for nested dicts of strings, numbers, booleans and arrays (tables as sections)."""
    lines: list[str] = []
    _emit_table(data, [], lines)
    return "\n".join(lines).strip() + "\n"


def _emit_table(data: dict, path: list[str], lines: list[str]) -> None:
    scalars = {k: v for k, v in data.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    if path and (scalars or not tables):
        lines.extend(["", f"[{'.'.join(_toml_key(p) for p in path)}]"])
    lines.extend(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in scalars.items())
    for key, table in tables.items():
        _emit_table(table, [*path, key], lines)


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _toml_string(key)


def _toml_string(text: str) -> str:
    # JSON string escapes are valid TOML basic-string escapes; DEL is the one control
    # character TOML forbids that JSON leaves raw.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value in (float("inf"), float("-inf")):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


# ---------------------------------------------------------------------------------------------
# Resolution against a model


@dataclass(frozen=True)
class Resolved:
    """A condition checked against its model: the prompts with token ids, the sites, the target."""

    condition: Condition
    model: Any  # models.LoadedModel
    prompts: PromptSet
    sites: tuple[Site, ...]  # record.sites, in layer order
    target: Any  # target.Target

    @property
    def unit_sites(self) -> tuple[Site, ...]:
        return tuple(s for s in self.sites if s.is_unit_site)


def open_model(condition: Condition):
    """Load the condition's model as its [model] section says."""
    from .models import load_model

    spec = condition.model
    _check_device_present(spec.device, condition.path)
    return load_model(
        spec.name,
        device=spec.device,
        dtype=spec.dtype,
        trust_remote_code=spec.trust_remote_code,
        allow_pickle=spec.allow_pickle,
        device_map=spec.device_map or None,
        source=condition.path,
    )


def _check_device_present(device: str, source) -> None:
    """One line, not a traceback from deep in torch, when this machine lacks the device asked for."""
    import torch

    kind, _, index = device.partition(":")
    if kind == "cpu":
        return
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if int(index or 0) >= count:
            raise ReduceError(f"device {device!r} was asked for but torch sees {count} CUDA device(s)", file=source, field="model.device")
        return
    backend = getattr(torch, kind, None) or getattr(torch.backends, kind, None)
    if backend is None or not backend.is_available():
        raise ReduceError(f"device {device!r} was asked for but torch has no {kind} device here", file=source, field="model.device")


def resolve(condition: Condition, model=None) -> Resolved:
    """Check the condition against ``model`` (loaded from [model] when None)."""
    from .prompts import build_prompts
    from .sites import resolve_sites
    from .target import Target

    model = open_model(condition) if model is None else model
    source, spec = condition.path, condition.target
    prompts = build_prompts(condition, model)
    sites = tuple(resolve_sites(condition.record.sites, model.n_layers, source=source, field="record.sites"))
    target_site = None
    if spec.kind == "neuron":
        target_site = Site.parse(spec.site, source=source, field="target.site")
        if target_site.layer >= model.n_layers:
            raise ReduceError(f"site {spec.site!r} does not exist: the model has layers 0..{model.n_layers - 1}", file=source, field="target.site")
        size = model.n_units(target_site)
        if spec.unit >= size:
            raise ReduceError(f"unit {spec.unit} is out of range: {spec.site} has {size} units (0..{size - 1})", file=source, field="target.unit")
    elif model.unembed is None:
        raise ReduceError(
            f"a {spec.kind} target needs a language-model head, and {model.name!r} loads as {type(model.module).__name__} without one; use kind = \"neuron\"",
            file=source,
            field="target.kind",
        )
    if isinstance(spec.position, int):
        outside = (prompts.lengths <= spec.position) | (prompts.lengths < -spec.position)
        if outside.any():
            i = int(outside.argmax())
            raise ReduceError(
                f"position {spec.position} lies outside prompt {i} ({prompts.texts[i]!r}, {prompts.lengths[i]} tokens)",
                file=source,
                field="target.position",
            )
    target = Target(spec.kind, site=target_site, unit=spec.unit, position=spec.position)
    return Resolved(condition, model, prompts, sites, target)
