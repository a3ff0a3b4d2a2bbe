"""The condition's prompts: a template crossed over its slots, or a .txt / .jsonl file.

Templates name slots as ``{slot}`` (the value's ``text``) or ``{slot.field}``; ``{{`` and ``}}``
are literal braces. Substitution is a regular expression over those forms and nothing else:
no ``str.format``, no evaluation. The slot product is enumerated lazily, so a cap
(``max_prompts``) over a huge product costs only the prompts kept: a seeded sample of the product
(or the file), kept in product (file) order so prompts read naturally.
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import ReduceError

if TYPE_CHECKING:
    from .condition import Condition

_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)(?:\.([A-Za-z_][A-Za-z0-9_]*))?\}")
_BRACE = re.compile(r"\{\{|\}\}|\{[^{}]*\}?|\}")
PROMPT_KEYS = ("text", "answer", "wrong", "counterfactual")  # per-prompt strings a file may carry
UNCAPPED_LIMIT = 1_000_000  # a larger slot product needs prompts.max_prompts


def template_fields(template: str, *, source=None, field: str = "prompts.template") -> list[tuple[str, str]]:
    """The ``(slot, field)`` pairs a template uses (``field`` is ``"text"`` for a bare ``{slot}``)."""
    for match in _BRACE.finditer(template):
        piece = match.group()
        if piece not in ("{{", "}}") and not _PLACEHOLDER.fullmatch(piece):
            raise ReduceError(
                f"malformed placeholder {piece!r} in {template!r}: write {{slot}} or {{slot.field}}, and {{{{ / }}}} for literal braces",
                file=source,
                field=field,
            )
    return [(m.group(1), m.group(2) or "text") for m in _PLACEHOLDER.finditer(template) if m.group(1)]


def render(template: str, choice: dict[str, dict[str, str]]) -> str:
    """Fill a template from one value per slot (each a table of strings with a ``text`` key)."""

    def substitute(match: re.Match) -> str:
        if match.group(1) is None:
            return match.group()[0]
        return choice[match.group(1)][match.group(2) or "text"]

    return _PLACEHOLDER.sub(substitute, template)


def read_prompt_file(path, *, source=None, field: str = "prompts.file") -> list[dict[str, str]]:
    """Records of a prompt file: .txt (one prompt per non-blank line) or .jsonl (one object per line).

    Every .jsonl record needs a non-empty ``text``; ``answer``, ``wrong`` and ``counterfactual``
    are strings; every other key is a label (string, number or boolean, stored as a string).
    All records carry the same keys, so every prompt has every label.
    """
    path = Path(path)
    if path.suffix not in (".txt", ".jsonl"):
        raise ReduceError(f"prompt file {str(path)!r} must end in .txt or .jsonl", file=source, field=field)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ReduceError(f"prompt file {str(path)!r} does not exist", file=source, field=field) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ReduceError(f"cannot read prompt file {str(path)!r}: {exc}", file=source, field=field) from None
    numbered = [(number, line) for number, line in enumerate(lines, 1) if line.strip()]
    if path.suffix == ".txt":
        records = [{"text": line} for _, line in numbered]
    else:
        records = [_jsonl_record(line, path, number) for number, line in numbered]
        first_keys = set(records[0]) if records else set()
        for (number, _), record in zip(numbered, records):
            if set(record) != first_keys:
                differing = sorted(set(record) ^ first_keys)
                raise ReduceError(
                    f"every record needs the same keys as the first; this one differs in {', '.join(differing)}",
                    file=path,
                    field=f"line {number}",
                )
    if not records:
        raise ReduceError(f"prompt file {str(path)!r} holds no prompts", file=source, field=field)
    return records


def _jsonl_record(line: str, path: Path, number: int) -> dict[str, str]:
    where = f"line {number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ReduceError(f"invalid JSON: {exc.msg} (column {exc.colno})", file=path, field=where) from None
    if not isinstance(record, dict):
        raise ReduceError(f"expected a JSON object, got {type(record).__name__}", file=path, field=where)
    if not isinstance(record.get("text"), str) or not record["text"].strip():
        raise ReduceError("every record needs a non-empty string 'text'", file=path, field=f"{where}.text")
    out = {}
    for key, value in record.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ReduceError(f"key {key!r} is not a valid label name (letters, digits, _)", file=path, field=f"{where}.{key}")
        if key in PROMPT_KEYS and not isinstance(value, str):
            raise ReduceError(f"{key!r} must be a string, got {json.dumps(value)}", file=path, field=f"{where}.{key}")
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, (int, float)):
            value = str(value)
        elif not isinstance(value, str):
            raise ReduceError(f"label {key!r} must be a string, number or boolean, got {json.dumps(value)}", file=path, field=f"{where}.{key}")
        out[key] = value
    return out


@dataclass(frozen=True)
class PromptSet:
    """The prompts of a condition, in order, with their answers, counterfactuals and labels.

    Token ids and lengths are filled when built with a model: ``answer_ids`` / ``wrong_ids``
    (one token each), ``lengths`` (tokens per prompt, special tokens included).
    """

    texts: tuple[str, ...]
    answers: tuple[str, ...] | None = None
    wrongs: tuple[str, ...] | None = None
    counterfactuals: tuple[str, ...] | None = None
    labels: dict[str, tuple[str, ...]] = field(default_factory=dict)
    answer_ids: np.ndarray | None = None
    wrong_ids: np.ndarray | None = None
    lengths: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.texts)


def build_prompts(condition: "Condition", model=None) -> PromptSet:
    """The condition's prompts; with a model, also their token ids, checked to be well formed.

    Model checks: each answer / wrong answer is one token, each counterfactual has the same
    number of tokens as its prompt.
    """
    spec = condition.prompts
    if spec.file is not None:
        records = _sample(read_prompt_file(spec.file, source=condition.path), spec.max_prompts, condition.seed)
    else:
        records = _template_records(condition)
    blank = next((i for i, record in enumerate(records) if not record["text"].strip()), None)
    if blank is not None:
        raise ReduceError(f"prompt {blank} is empty", file=condition.path, field=_source_field(condition, "template"))
    columns = {key: tuple(r[key] for r in records) for key in records[0]}
    prompts = PromptSet(
        texts=columns.pop("text"),
        answers=columns.pop("answer", None),
        wrongs=columns.pop("wrong", None),
        counterfactuals=columns.pop("counterfactual", None),
        labels=columns,
    )
    return prompts if model is None else _tokenize(prompts, model, condition)


def _sample(items: list, cap: int | None, seed: int) -> list:
    if cap is None or cap >= len(items):
        return items
    return [items[i] for i in sorted(random.Random(seed).sample(range(len(items)), cap))]


def _template_records(condition: "Condition") -> list[dict[str, str]]:
    spec = condition.prompts
    names = list(spec.slots)
    sizes = [len(spec.slots[name]) for name in names]
    total = math.prod(sizes)
    if spec.max_prompts is None and total > UNCAPPED_LIMIT:
        raise ReduceError(f"the slots make {total:,} prompts; set prompts.max_prompts to sample some", file=condition.path, field="prompts.max_prompts")
    kept = range(total) if spec.max_prompts is None or spec.max_prompts >= total else sorted(random.Random(condition.seed).sample(range(total), spec.max_prompts))
    templates = {"text": spec.template, "answer": spec.answer, "wrong": spec.wrong, "counterfactual": spec.counterfactual, **spec.labels}
    templates = {key: template for key, template in templates.items() if template is not None}
    records = []
    for flat in kept:
        choice = {}
        for name, size in zip(reversed(names), reversed(sizes)):  # mixed radix, first slot most significant
            flat, digit = divmod(flat, size)
            choice[name] = spec.slots[name][digit]
        records.append({key: render(template, choice) for key, template in templates.items()})
    return records


def _tokenize(prompts: PromptSet, model, condition: "Condition") -> PromptSet:
    from .batching import prepare_tokenizer

    if model.tokenizer is None:
        raise ReduceError(
            f"{model.arch.family} models take pixels, not text; a condition's prompts cannot drive them",
            file=condition.path,
            field="model.name",
        )
    tokenizer = prepare_tokenizer(model.tokenizer)
    lengths = np.array([len(ids) for ids in tokenizer(list(prompts.texts))["input_ids"]])
    limit = _max_positions(model)
    if limit is not None and lengths.max() > limit:
        i = int(lengths.argmax())
        raise ReduceError(f"prompt {i} ({prompts.texts[i]!r}) is {lengths[i]} tokens; the model takes at most {limit}", file=condition.path, field=_source_field(condition, "template"))
    if prompts.counterfactuals is not None:
        counter_lengths = np.array([len(ids) for ids in tokenizer(list(prompts.counterfactuals))["input_ids"]])
        for i in np.flatnonzero(counter_lengths != lengths)[:1]:
            raise ReduceError(
                f"counterfactual {prompts.counterfactuals[i]!r} is {counter_lengths[i]} tokens but its prompt {prompts.texts[i]!r} is {lengths[i]}; "
                "paired prompts must have the same token count",
                file=condition.path,
                field=_source_field(condition, "counterfactual"),
            )
    return PromptSet(
        texts=prompts.texts,
        answers=prompts.answers,
        wrongs=prompts.wrongs,
        counterfactuals=prompts.counterfactuals,
        labels=prompts.labels,
        answer_ids=_single_tokens(tokenizer, prompts.answers, condition, "answer"),
        wrong_ids=_single_tokens(tokenizer, prompts.wrongs, condition, "wrong"),
        lengths=lengths,
    )


def _single_tokens(tokenizer, strings, condition: "Condition", key: str) -> np.ndarray | None:
    if strings is None:
        return None
    distinct = list(dict.fromkeys(strings))
    encoded = tokenizer(distinct, add_special_tokens=False)["input_ids"]
    ids = {}
    for string, token_ids in zip(distinct, encoded):
        if len(token_ids) != 1:
            pieces = tokenizer.convert_ids_to_tokens(token_ids)
            first = strings.index(string)
            raise ReduceError(
                f"{key} {string!r} (of prompt {first}) is {len(token_ids)} tokens ({', '.join(map(repr, pieces))}) for this tokenizer; "
                "answers must be one token (GPT-2 style tokenizers usually want a leading space)",
                file=condition.path,
                field=_source_field(condition, key),
            )
        ids[string] = token_ids[0]
    return np.array([ids[s] for s in strings], dtype=np.int64)


def _source_field(condition: "Condition", key: str) -> str:
    return "prompts.file" if condition.prompts.file is not None else f"prompts.{key}"


def _max_positions(model) -> int | None:
    config = model.config
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            # RoBERTa reserves padding_idx + 1 position slots before the first token.
            offset = getattr(config, "pad_token_id", 0) + 1 if config.model_type in ("roberta", "xlm-roberta", "camembert") else 0
            return value - offset
    return None
