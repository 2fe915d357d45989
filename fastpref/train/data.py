"""Preference data: load rows, split each into prompt / chosen / rejected, tokenise, truncate.

Three input formats, told apart by a data set's columns (or forced with ``format=``):

* ``explicit``: text columns ``prompt``, ``chosen``, ``rejected``; the responses follow the prompt.
* ``implicit`` (e.g. HH-RLHF): text columns ``chosen`` and ``rejected`` hold whole texts that begin
  with the same prompt; as in TRL, the prompt is their longest common prefix, and each response is
  the rest (a space before the first difference goes with the responses: HH's ``" I'm sorry"``).
* ``conversational``: ``chosen`` / ``rejected`` are lists of ``{"role", "content"}`` messages, either
  the responses to a ``prompt`` list of messages, or whole conversations sharing every message but
  the final assistant one. They are rendered with the tokenizer's chat template.

Unpaired data (KTO) holds one ``completion`` per row and a boolean ``label`` (True: desirable),
with an explicit text ``prompt``, or as messages: a ``prompt`` list and a ``completion`` list, or
a whole conversation in ``completion`` whose final assistant message is the completion (implicit
prompt). Paired data trains KTO too: :func:`unpair` turns each pair into a desirable and an
undesirable example, as TRL's ``unpair_preference_dataset`` does.

A row that cannot be split without guessing is *malformed*. A mis-split pair trains on the wrong
tokens with no visible symptom, so every malformed row is reported with its index and a reason and
is either skipped (counted in the :class:`DataReport`) or raised, never split by a best guess.
"""
from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import io
import json
import os
from dataclasses import asdict, dataclass, field
from importlib import resources
from typing import Any, BinaryIO, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .wording import count_of

FORMATS = ("explicit", "implicit", "conversational")
TRUNCATION_MODES = ("keep_end", "keep_start")
MALFORMED_POLICIES = ("skip", "error")
BUNDLED_SAMPLE = "hh_rlhf_sample.jsonl.gz"
# A JSON file's rows that could not be read carry the reason here; they are malformed rows.
UNREADABLE_COLUMN = "__unreadable__"

_JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
_TOKENIZE_CHUNK_ROWS = 1024
_MALFORMED_ROWS_IN_ERROR = 5

Rows = Union[datasets.Dataset, Sequence[Mapping[str, Any]]]


@dataclass(frozen=True)
class TokenizedPair:
    """One preference pair as token ids: the prompt once, and each response without the prompt.

    Keeping the parts apart lets the packer lay out prompt + chosen and prompt + rejected and mark
    which tokens are response tokens. ``row`` is the index of the source row, so a pair can be
    traced back to its data.
    """

    prompt_ids: List[int]
    chosen_ids: List[int]
    rejected_ids: List[int]
    row: int

    @property
    def responses(self) -> Tuple[List[int], List[int]]:
        return self.chosen_ids, self.rejected_ids

    @property
    def pairs(self) -> Tuple[Tuple[int, int], ...]:
        return ((0, 1),)


@dataclass(frozen=True)
class TokenizedGroup:
    """A prompt's distinct responses and the pairs among them: ``pairs[k] = (i, j)`` prefers
    ``responses[i]`` to ``responses[j]``. Packed as one unit, its prompt and each response are
    computed once, whatever number of pairs a response is in (see :func:`group_by_prompt`).

    ``row``: the source row of its first pair, which keys the group (its reference log-probs, the
    train/eval split); ``rows``: the source row of each pair.
    """

    prompt_ids: List[int]
    responses: Tuple[List[int], ...]
    pairs: Tuple[Tuple[int, int], ...]
    row: int
    rows: Tuple[int, ...]


def group_by_prompt(pairs: Sequence[TokenizedPair]) -> List[TokenizedGroup]:
    """The pairs with the same prompt tokens as one group each, in the order of their first pair;
    a response that appears in several of them (token for token) is one response of its group. A
    pair whose two responses are the same tokens carries no preference and is refused."""
    groups: Dict[Tuple[int, ...], Tuple[List[int], Dict[Tuple[int, ...], int], List[Tuple[int, int]], List[int]]] = {}
    for pair in pairs:
        if pair.chosen_ids == pair.rejected_ids:
            raise ValueError(f"row {pair.row}: chosen and rejected are the same tokens")
        prompt, responses, links, rows = groups.setdefault(tuple(pair.prompt_ids), (pair.prompt_ids, {}, [], []))
        chosen = responses.setdefault(tuple(pair.chosen_ids), len(responses))
        rejected = responses.setdefault(tuple(pair.rejected_ids), len(responses))
        links.append((chosen, rejected))
        rows.append(pair.row)
    return [TokenizedGroup(prompt, tuple(list(r) for r in responses), tuple(links), rows[0], tuple(rows))
            for prompt, responses, links, rows in groups.values()]


@dataclass(frozen=True)
class TokenizedCompletion:
    """One unpaired example (KTO) as token ids: the prompt, the completion, and its label.

    ``label`` is True for a desirable completion. ``kl_completion_ids`` is another example's
    completion, which KTO's KL estimate scores after this prompt (see :func:`with_kl_completions`).
    ``row`` is the source row; the two examples :func:`unpair` makes of a pair share their pair's.
    """

    prompt_ids: List[int]
    completion_ids: List[int]
    label: bool
    row: int
    kl_completion_ids: List[int] = field(default_factory=list)

    @property
    def key(self) -> int:
        """Unique among the examples of a data set: the source row and the label."""
        return 2 * self.row + (0 if self.label else 1)

    def with_kl_completion(self) -> TokenizedPair:
        """The completion and the KL completion as the two responses to the prompt (row: ``key``),
        so that one packed forward scores both, as for a pair (the reference pass)."""
        return TokenizedPair(self.prompt_ids, self.completion_ids, self.kl_completion_ids, self.key)


# How the reports number rows: as datasets does, which is not a file's line number.
ROW_NUMBERING = "rows are counted from 0: row N of a JSONL file is its line N + 1"


@dataclass
class DataReport:
    """What :func:`tokenize_pairs` did with the rows: pairs kept, rows skipped and why, tokens cut.

    Meant to be shown before training, so that dropped or truncated data is visible rather than
    silently missing. ``skipped`` maps each reason to the source row indices it applied to;
    ``prompts_truncated`` counts pairs whose prompt was cut, ``responses_truncated`` pairs with at
    least one response cut.
    """

    format: str
    truncation_mode: str
    max_length: int
    max_prompt_length: int
    rows_read: int = 0
    pairs_kept: int = 0  # pairs, or examples of unpaired data
    unit: str = "pair"
    skipped: Dict[str, List[int]] = field(default_factory=dict)
    prompts_truncated: int = 0
    responses_truncated: int = 0

    @property
    def rows_skipped(self) -> int:
        return sum(len(rows) for rows in self.skipped.values())

    def summary(self, rows_shown: int = 5) -> str:
        """A few lines for a log: counts, and the first ``rows_shown`` skipped rows of each reason."""
        lines = [
            f"{count_of(self.rows_read, 'row')} read ({self.format} format): "
            f"{count_of(self.pairs_kept, self.unit)} kept, {count_of(self.rows_skipped, 'row')} skipped"
        ]
        for reason, rows in self.skipped.items():
            shown = ", ".join(str(row) for row in rows[:rows_shown])
            more = ", ..." if len(rows) > rows_shown else ""
            lines.append(f"  skipped ({reason}): {count_of(len(rows), 'row')}: {shown}{more}")
        if self.skipped:
            lines.append(f"  ({ROW_NUMBERING})")
        lines.append(
            f"truncation {self.truncation_mode} to {count_of(self.max_length, 'token')}, prompt to "
            f"{self.max_prompt_length}: {count_of(self.prompts_truncated, 'prompt')} cut, "
            f"{count_of(self.responses_truncated, self.unit)} with a response cut"
        )
        return "\n".join(lines)

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------------------- loading


def load_rows(
    source: Optional[Union[str, os.PathLike]] = None, *, split: Optional[str] = None
) -> datasets.Dataset:
    """Load preference rows from a local file or saved data set; ``None`` loads the bundled sample.

    Accepts JSON lines or a JSON array (``.jsonl`` / ``.json``, optionally ``.gz``), Parquet
    (``.parquet``), or a directory written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``
    (``split`` picks the split of a ``DatasetDict``, default ``"train"``). Nothing is ever downloaded:
    a name that is not a local path, such as a Hub data set id, is an error, so a run never depends
    on the network or on what a remote repository holds today.
    """
    if source is None:
        _reject_split(split, "the bundled sample")
        resource = resources.files("fastpref").joinpath("data").joinpath(BUNDLED_SAMPLE)
        with resource.open("rb") as stream:
            return _json_rows(stream, compressed=True, name=f"bundled sample {BUNDLED_SAMPLE}")
    path = os.fspath(source)
    if os.path.isdir(path):
        return _load_saved(path, split)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"not a local file or directory: {path!r} (load_rows reads local JSONL, JSON or Parquet "
            "files and save_to_disk directories; it never downloads)"
        )
    _reject_split(split, path)
    lowered = path.lower()
    if lowered.endswith(".parquet"):
        return datasets.Dataset(pq.read_table(path))
    if lowered.endswith(_JSON_SUFFIXES):
        with open(path, "rb") as stream:
            return _json_rows(stream, compressed=lowered.endswith(".gz"), name=path)
    raise ValueError(
        f"unsupported file type: {path!r}; expected one of {', '.join(_JSON_SUFFIXES)}, .parquet, "
        "or a directory saved with save_to_disk"
    )


def _reject_split(split: Optional[str], source: str) -> None:
    if split is not None:
        raise ValueError(f"split={split!r} only applies to a saved DatasetDict directory, not to {source}")


def _load_saved(path: str, split: Optional[str]) -> datasets.Dataset:
    try:
        loaded = datasets.load_from_disk(path)
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"{path!r} is a directory but not a data set written by Dataset.save_to_disk or "
            "DatasetDict.save_to_disk"
        ) from exc
    if isinstance(loaded, datasets.DatasetDict):
        name = "train" if split is None else split
        if name not in loaded:
            raise ValueError(f"split={name!r} is not in {path!r}; its splits are {sorted(loaded)}")
        return loaded[name]
    _reject_split(split, f"{path!r}, which holds a single Dataset")
    return loaded


def _json_rows(stream: BinaryIO, *, compressed: bool, name: str) -> datasets.Dataset:
    """Parse JSON here rather than through ``datasets.load_dataset``: no builder to resolve, no cache
    directory written, and a line that is not a JSON object becomes a malformed row (column
    ``UNREADABLE_COLUMN`` holds why), skipped and reported by its row like any other."""
    if compressed:
        stream = gzip.GzipFile(fileobj=stream)
    text = io.TextIOWrapper(stream, encoding="utf-8").read()
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{name}: not a valid JSON array ({exc})") from exc
    else:
        # Split on "\n" only: str.splitlines would also break at U+2028 and the like, which JSON
        # allows unescaped inside strings. Every line is a row, blank ones included, so that row N
        # is line N + 1 of the file.
        lines = text.split("\n")
        while lines and not lines[-1].strip():
            lines.pop()
        items = [_parse_line(line) for line in lines]
    records = [item if isinstance(item, dict) else
               {UNREADABLE_COLUMN: item.reason if isinstance(item, _Unreadable) else
                f"a JSON {type(item).__name__}, not an object"}
               for item in items]
    return _records_to_dataset(records, name)


class _Unreadable:
    """A JSON line that could not be parsed: a malformed row, reported with the others."""

    def __init__(self, reason: str):
        self.reason = reason


def _parse_line(line: str) -> Any:
    if not line.strip():
        return _Unreadable("blank line")
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return _Unreadable("not valid JSON")


def _records_to_dataset(records: List[Dict[str, Any]], name: str) -> datasets.Dataset:
    """A column per key seen in any record; a record without a key gets null there, which the
    splitting reports as a missing field of that row."""
    keys: Dict[str, None] = {}
    for record in records:
        keys.update(dict.fromkeys(record))
    columns = {}
    for key in keys:
        try:
            columns[key] = pa.array([record.get(key) for record in records])
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise ValueError(
                f"{name}: column {key!r} mixes kinds of value across rows ({exc}); each of prompt, "
                "chosen and rejected must be text in every row, or a list of messages in every row"
            ) from exc
    return datasets.Dataset(pa.table(columns))


# --------------------------------------------------------------------------------------- splitting


class _Malformed(Exception):
    """A row that cannot be split into prompt / chosen / rejected; the message is the reported reason."""


def _text_field(row: Mapping[str, Any], key: str) -> str:
    value = row.get(key)
    if value is None:
        raise _Malformed(f"missing {key!r}")
    if not isinstance(value, str):
        raise _Malformed(f"{key!r} is not a string")
    return value


def _check_responses(chosen: Any, rejected: Any, *, chosen_empty: bool, rejected_empty: bool) -> None:
    if chosen_empty:
        raise _Malformed("empty chosen response")
    if rejected_empty:
        raise _Malformed("empty rejected response")
    if chosen == rejected:
        raise _Malformed("chosen == rejected")


def _split_explicit(row: Mapping[str, Any]) -> Tuple[str, str, str]:
    prompt = _text_field(row, "prompt")
    chosen = _text_field(row, "chosen")
    rejected = _text_field(row, "rejected")
    _check_responses(chosen, rejected, chosen_empty=not chosen.strip(), rejected_empty=not rejected.strip())
    return prompt, chosen, rejected


def _split_implicit(row: Mapping[str, Any]) -> Tuple[str, str, str]:
    """The prompt is the longest common prefix of the two texts, as TRL's ``extract_prompt`` cuts
    it: a space just before the first difference stays with the responses (HH-RLHF's
    ``"...\n\nAssistant:"`` prompt, responses ``" I'm sorry"`` and ``" Sure"``)."""
    chosen, rejected = _text_field(row, "chosen"), _text_field(row, "rejected")
    if chosen == rejected:
        raise _Malformed("chosen == rejected")
    cut = len(os.path.commonprefix([chosen, rejected]))
    if cut and chosen[cut - 1] == " ":
        cut -= 1
    prompt, chosen, rejected = chosen[:cut], chosen[cut:], rejected[cut:]
    _check_responses(chosen, rejected, chosen_empty=not chosen.strip(), rejected_empty=not rejected.strip())
    return prompt, chosen, rejected


def _is_message(message: Any) -> bool:
    return (
        isinstance(message, Mapping)
        and isinstance(message.get("role"), str)
        and isinstance(message.get("content"), str)
    )


def _messages_field(row: Mapping[str, Any], key: str) -> List[Dict[str, Any]]:
    """The messages of ``row[key]``, without the null keys Arrow adds where other rows' messages had
    extra keys (a template would render them as ``None``)."""
    value = row.get(key)
    if value is None:
        raise _Malformed(f"missing {key!r}")
    if not isinstance(value, list) or not all(_is_message(message) for message in value):
        raise _Malformed(f"{key!r} is not a list of role/content messages")
    return [{name: item for name, item in message.items() if item is not None} for message in value]


def _render(tokenizer: Any, messages: List[Dict[str, Any]], *, add_generation_prompt: bool) -> str:
    # jinja2 comes with chat-template support, which only this format needs.
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except TemplateError as exc:
        raise _Malformed("chat template error") from exc


def _rendered_response(
    tokenizer: Any, prompt: List[Dict[str, Any]], prompt_text: str, response: List[Dict[str, Any]]
) -> str:
    full_text = _render(tokenizer, prompt + response, add_generation_prompt=False)
    if not full_text.startswith(prompt_text):
        raise _Malformed("chat template does not extend the prompt")
    return full_text[len(prompt_text):]


def _split_conversational(
    row: Mapping[str, Any], *, tokenizer: Any, has_prompt: bool
) -> Tuple[str, str, str]:
    """Render prompt and prompt + response; the response text is what the second adds to the first,
    so template scaffolding (role headers, end-of-turn tokens) lands on the side it belongs to."""
    chosen = _messages_field(row, "chosen")
    rejected = _messages_field(row, "rejected")
    if has_prompt:
        prompt = _messages_field(row, "prompt")
    else:
        for key, conversation in (("chosen", chosen), ("rejected", rejected)):
            if not conversation or conversation[-1]["role"] != "assistant":
                raise _Malformed(f"{key} does not end with an assistant message")
        if chosen[:-1] != rejected[:-1]:
            raise _Malformed("implicit prompt mismatch")
        prompt, chosen, rejected = chosen[:-1], chosen[-1:], rejected[-1:]
    _check_responses(
        chosen,
        rejected,
        chosen_empty=not any(message["content"].strip() for message in chosen),
        rejected_empty=not any(message["content"].strip() for message in rejected),
    )
    prompt_text = _render(tokenizer, prompt, add_generation_prompt=True)
    return (
        prompt_text,
        _rendered_response(tokenizer, prompt, prompt_text, chosen),
        _rendered_response(tokenizer, prompt, prompt_text, rejected),
    )


def _label_field(row: Mapping[str, Any]) -> bool:
    """An unpaired row's label: true/false (or 1/0, which TRL reads the same way)."""
    value = row.get("label")
    if value is None:
        raise _Malformed("missing 'label'")
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise _Malformed("'label' is not true or false")


def _split_unpaired_explicit(row: Mapping[str, Any]) -> Tuple[str, str]:
    prompt, completion = _text_field(row, "prompt"), _text_field(row, "completion")
    if not completion.strip():
        raise _Malformed("empty completion")
    return prompt, completion


def _split_unpaired_conversational(row: Mapping[str, Any], *, tokenizer: Any, has_prompt: bool) -> Tuple[str, str]:
    """As :func:`_split_conversational`, for one completion; without a prompt column the
    completion is a whole conversation, and its final assistant message the completion."""
    completion = _messages_field(row, "completion")
    if has_prompt:
        prompt = _messages_field(row, "prompt")
    else:
        if not completion or completion[-1]["role"] != "assistant":
            raise _Malformed("completion does not end with an assistant message")
        prompt, completion = completion[:-1], completion[-1:]
    if not any(message["content"].strip() for message in completion):
        raise _Malformed("empty completion")
    prompt_text = _render(tokenizer, prompt, add_generation_prompt=True)
    return prompt_text, _rendered_response(tokenizer, prompt, prompt_text, completion)


def is_unpaired(rows: Rows) -> bool:
    """Whether `rows` hold unpaired examples (a ``completion`` column) rather than pairs."""
    columns = _column_names(rows)
    return "completion" in columns and not {"chosen", "rejected"} & set(columns)


def _column_names(rows: Rows) -> List[str]:
    if isinstance(rows, datasets.Dataset):
        return [name for name in rows.column_names if name != UNREADABLE_COLUMN]
    if isinstance(rows, datasets.DatasetDict):
        raise TypeError(
            f"rows is a DatasetDict with splits {sorted(rows)}; pass one split, e.g. rows['train']"
        )
    if isinstance(rows, (str, bytes, Mapping)) or not isinstance(rows, Sequence):
        raise TypeError(
            f"rows must be a datasets.Dataset or a sequence of row mappings, got {type(rows).__name__}"
        )
    names: Dict[str, None] = {}
    for row in rows:
        if isinstance(row, Mapping):
            names.update(dict.fromkeys(row))
    return list(names)


def _resolve_format(rows: Rows, columns: List[str], requested: str) -> str:
    missing = [key for key in ("chosen", "rejected") if key not in columns]
    if missing:
        raise ValueError(
            f"rows have no {' or '.join(map(repr, missing))} column (columns: {columns}); preference "
            "data needs 'chosen' and 'rejected', plus 'prompt' for the explicit format"
        )
    if requested == "explicit" and "prompt" not in columns:
        raise ValueError(f"format='explicit' needs a 'prompt' column; the columns are {columns}")
    if requested != "auto":
        return requested
    first_chosen = next(
        (row["chosen"] for row in rows if isinstance(row, Mapping) and row.get("chosen") is not None), None
    )
    if isinstance(first_chosen, list):
        return "conversational"
    if first_chosen is None or isinstance(first_chosen, str):
        return "explicit" if "prompt" in columns else "implicit"
    raise ValueError(
        f"cannot detect the format: 'chosen' holds {type(first_chosen).__name__} values, expected text "
        f"or a list of messages; pass format= one of {FORMATS}"
    )


def _resolve_unpaired_format(rows: Rows, columns: List[str], requested: str) -> str:
    missing = [key for key in ("completion", "label") if key not in columns]
    if missing:
        raise ValueError(
            f"rows have no {' or '.join(map(repr, missing))} column (columns: {columns}); unpaired data "
            "needs 'completion' and 'label' (true: desirable), plus 'prompt' unless the completions are "
            "whole conversations"
        )
    first = next(
        (row["completion"] for row in rows if isinstance(row, Mapping) and row.get("completion") is not None), None
    )
    detected = "conversational" if isinstance(first, list) else "explicit"
    resolved = detected if requested == "auto" else requested
    if resolved == "implicit" or (resolved == "explicit" and "prompt" not in columns):
        raise ValueError(
            f"unpaired text rows need a 'prompt' column (columns: {columns}): a lone completion does not say "
            "where its prompt ends; only conversational completions (lists of messages) may hold their prompt"
        )
    return resolved


# ------------------------------------------------------------------------------------ tokenisation


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _encode(tokenizer: Any, texts: List[str]) -> List[List[int]]:
    # Special tokens are added by hand (BOS, EOS) so the pieces can be tokenised separately.
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _with_bos(ids: List[int], bos_token_id: Optional[int]) -> List[int]:
    """BOS first, unless the text already began with it (chat templates often render it)."""
    if bos_token_id is None or ids[:1] == [bos_token_id]:
        return ids
    return [bos_token_id] + ids


def _with_eos(ids: List[int], eos_token_id: Optional[int]) -> List[int]:
    """EOS last, so the model learns where a response stops, unless the text already ended with it."""
    if eos_token_id is None or ids[-1:] == [eos_token_id]:
        return ids
    return ids + [eos_token_id]


def cut_prompt(prompt: List[int], max_prompt_length: int, keep_end: bool, bos_token_id: Optional[int]) -> List[int]:
    """`prompt` cut to `max_prompt_length` tokens: its end kept (the part nearest the response, and
    a leading BOS, which the model expects) or its start."""
    if len(prompt) <= max_prompt_length:
        return prompt
    if keep_end:
        head = prompt[:1] if bos_token_id is not None and prompt[:1] == [bos_token_id] else []
        return head + prompt[len(prompt) - (max_prompt_length - len(head)):]
    return prompt[:max_prompt_length]


@dataclass(frozen=True)
class _Truncation:
    max_length: int
    max_prompt_length: int
    keep_end: bool
    bos_token_id: Optional[int]

    def apply(self, prompt: List[int], responses: List[List[int]]) -> Tuple[List[int], List[List[int]], bool, bool]:
        """Cut an example longer than ``max_length`` (prompt + its longest response): the prompt
        first, to ``max_prompt_length`` (keeping its end, the part nearest the response, or its
        start), then each response to what is left, keeping its start. A leading BOS survives a
        ``keep_end`` cut, since the model expects it.

        Returns the prompt, the responses, and whether the prompt, and whether a response, was cut.
        """
        longest = max(len(response) for response in responses)
        if len(prompt) + longest <= self.max_length:
            return prompt, responses, False, False
        prompt_cut = len(prompt) > self.max_prompt_length
        prompt = cut_prompt(prompt, self.max_prompt_length, self.keep_end, self.bos_token_id)
        room = self.max_length - len(prompt)
        if room <= 0:
            raise _Malformed("response truncated away")
        return prompt, [response[:room] for response in responses], prompt_cut, longest > room


def _check_tokenize_options(truncation_mode, on_malformed, format, max_length, max_prompt_length) -> None:
    _check_choice("truncation_mode", truncation_mode, TRUNCATION_MODES)
    _check_choice("on_malformed", on_malformed, MALFORMED_POLICIES)
    _check_choice("format", format, ("auto",) + FORMATS)
    _check_positive_int("max_length", max_length)
    _check_positive_int("max_prompt_length", max_prompt_length)


def _check_chat_template(tokenizer: Any) -> None:
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the conversational format needs a tokenizer with a chat_template; this one has none")


# one split row: (prompt text, response texts...) and what else the row carries (an unpaired label)
_Split = Callable[[Mapping[str, Any]], Tuple[Tuple[str, ...], Any]]


def _tokenize_rows(
    rows: Rows, tokenizer: Any, split: _Split, report: DataReport, *, on_malformed: str, add_bos: bool
) -> List[Tuple[int, List[int], List[List[int]], Any]]:
    """(row index, prompt ids, response ids, the row's extra) of every row `split` and the
    truncation keep; the others are counted in `report` (see :func:`tokenize_pairs`)."""
    malformed: List[Tuple[int, str]] = []
    split_rows: List[Tuple[int, Tuple[str, ...], Any]] = []
    for index, row in enumerate(rows):
        try:
            if not isinstance(row, Mapping):
                raise _Malformed("row is not a mapping")
            if row.get(UNREADABLE_COLUMN):
                raise _Malformed(row[UNREADABLE_COLUMN])
            split_rows.append((index, *split(row)))
        except _Malformed as reason:
            malformed.append((index, str(reason)))

    bos_token_id = tokenizer.bos_token_id if add_bos else None
    eos_token_id = tokenizer.eos_token_id
    truncation = _Truncation(
        report.max_length, report.max_prompt_length, report.truncation_mode == "keep_end", bos_token_id
    )
    kept: List[Tuple[int, List[int], List[List[int]], Any]] = []
    for start in range(0, len(split_rows), _TOKENIZE_CHUNK_ROWS):
        chunk = split_rows[start : start + _TOKENIZE_CHUNK_ROWS]
        prompts = _encode(tokenizer, [texts[0] for _, texts, _ in chunk])
        responses = [_encode(tokenizer, [texts[part] for _, texts, _ in chunk]) for part in range(1, len(chunk[0][1]))]
        for position, ((index, _, extra), prompt) in enumerate(zip(chunk, prompts)):
            try:
                prompt = _with_bos(prompt, bos_token_id)
                if not prompt:
                    raise _Malformed("empty prompt")
                prompt, cut_responses, prompt_cut, response_cut = truncation.apply(
                    prompt, [_with_eos(part[position], eos_token_id) for part in responses]
                )
            except _Malformed as reason:
                malformed.append((index, str(reason)))
                continue
            report.prompts_truncated += prompt_cut
            report.responses_truncated += response_cut
            kept.append((index, prompt, cut_responses, extra))

    malformed.sort()
    for index, reason in malformed:
        report.skipped.setdefault(reason, []).append(index)
    report.pairs_kept = len(kept)
    if malformed and on_malformed == "error":
        listed = "; ".join(f"row {index}: {reason}" for index, reason in malformed[:_MALFORMED_ROWS_IN_ERROR])
        more = len(malformed) - _MALFORMED_ROWS_IN_ERROR
        raise ValueError(
            f"{count_of(len(malformed), 'malformed row')} ({listed}{f'; and {more} more' if more > 0 else ''}; "
            f"{ROW_NUMBERING}); fix them or pass on_malformed='skip' to drop them"
        )
    return kept


def tokenize_pairs(
    rows: Rows,
    tokenizer: Any,
    *,
    max_length: int = 512,
    max_prompt_length: int = 256,
    truncation_mode: str = "keep_end",
    on_malformed: str = "skip",
    format: str = "auto",
    add_bos: bool = True,
) -> Tuple[List[TokenizedPair], DataReport]:
    """Split and tokenise preference rows into :class:`TokenizedPair` s, with a :class:`DataReport`.

    The prompt and the two responses are tokenised separately, so the prompt tokens are identical in
    both sequences of a pair and the response boundary is exact. The tokenizer's BOS goes before the
    prompt (when it has one and ``add_bos``) and its EOS after each response (when it has one).
    A pair longer than ``max_length`` tokens (prompt + longer response) is cut: first the prompt, to
    ``max_prompt_length`` tokens, keeping its end (``truncation_mode="keep_end"``: the part nearest the
    response, and a leading BOS) or its start (``"keep_start"``); then each response to the room left,
    keeping its start.

    Malformed rows (missing or mistyped fields, an empty response, chosen equal to rejected, a
    conversation whose earlier messages differ, a chat template that does not extend the prompt, a prompt of no tokens,
    a response truncated away) are skipped and reported with ``on_malformed="skip"``, or make this
    raise ``ValueError`` naming the first few with ``on_malformed="error"``.
    """
    _check_tokenize_options(truncation_mode, on_malformed, format, max_length, max_prompt_length)
    columns = _column_names(rows)
    if len(rows) == 0:
        raise ValueError("the data is empty: it holds no rows")
    resolved = _resolve_format(rows, columns, format)
    split: Callable[[Mapping[str, Any]], Tuple[str, str, str]]
    if resolved == "explicit":
        split = _split_explicit
    elif resolved == "implicit":
        split = _split_implicit
    else:
        _check_chat_template(tokenizer)
        split = functools.partial(_split_conversational, tokenizer=tokenizer, has_prompt="prompt" in columns)
    report = DataReport(resolved, truncation_mode, max_length, max_prompt_length, rows_read=len(rows))
    kept = _tokenize_rows(rows, tokenizer, lambda row: (split(row), None), report,
                          on_malformed=on_malformed, add_bos=add_bos)
    return [TokenizedPair(prompt, chosen, rejected, index) for index, prompt, (chosen, rejected), _ in kept], report


def tokenize_unpaired(
    rows: Rows,
    tokenizer: Any,
    *,
    max_length: int = 512,
    max_prompt_length: int = 256,
    truncation_mode: str = "keep_end",
    on_malformed: str = "skip",
    format: str = "auto",
    add_bos: bool = True,
) -> Tuple[List[TokenizedCompletion], DataReport]:
    """Split and tokenise unpaired rows (``prompt``, ``completion``, ``label``) into
    :class:`TokenizedCompletion` s, with a :class:`DataReport`: as :func:`tokenize_pairs`, with one
    response per row. A row whose label is missing or not true/false (1/0) is malformed. The
    examples carry no KL completion yet (:func:`with_kl_completions` adds them).
    """
    _check_tokenize_options(truncation_mode, on_malformed, format, max_length, max_prompt_length)
    columns = _column_names(rows)
    if len(rows) == 0:
        raise ValueError("the data is empty: it holds no rows")
    resolved = _resolve_unpaired_format(rows, columns, format)
    split: Callable[[Mapping[str, Any]], Tuple[str, str]] = _split_unpaired_explicit
    if resolved == "conversational":
        _check_chat_template(tokenizer)
        split = functools.partial(_split_unpaired_conversational, tokenizer=tokenizer,
                                  has_prompt="prompt" in columns)
    report = DataReport(resolved, truncation_mode, max_length, max_prompt_length, rows_read=len(rows),
                        unit="example")
    kept = _tokenize_rows(rows, tokenizer, lambda row: (split(row), _label_field(row)), report,
                          on_malformed=on_malformed, add_bos=add_bos)
    return [TokenizedCompletion(prompt, completion, label, index)
            for index, prompt, (completion,), label in kept], report


# ---------------------------------------------------------------------------------- after tokenising


def _digest(version: bytes, records: Iterable[List[int]]) -> str:
    digest = hashlib.sha256(version)
    for ids in records:
        digest.update(np.asarray(ids, dtype="<i8").tobytes())
    return digest.hexdigest()


def fingerprint_pairs(examples: Sequence[TokenizedPair]) -> str:
    """A sha256 hex digest of every pair's row index and token ids, in order.

    Cached reference log-probs are only valid for exactly these token sequences, so the digest is
    their cache key: any change of data, tokenizer, template or truncation changes it. Lengths are
    hashed too, so moving a token across the prompt/response boundary changes the digest.
    """
    return _digest(b"fastpref tokenized pairs v1", (
        [e.row, len(e.prompt_ids), len(e.chosen_ids), len(e.rejected_ids)] + e.prompt_ids + e.chosen_ids
        + e.rejected_ids for e in examples))


def fingerprint_groups(groups: Sequence[TokenizedGroup]) -> str:
    """As :func:`fingerprint_pairs`, for prompt groups: rows, responses and pairs."""
    return _digest(b"fastpref tokenized groups v1", (
        [g.row, len(g.prompt_ids), len(g.responses), *g.rows, *(i for pair in g.pairs for i in pair)]
        + g.prompt_ids + [token for response in g.responses for token in [len(response), *response]]
        for g in groups))


def fingerprint_completions(examples: Sequence[TokenizedCompletion]) -> str:
    """As :func:`fingerprint_pairs`, for unpaired examples: row, label, and the token ids of the
    prompt, the completion and the KL completion."""
    return _digest(b"fastpref tokenized completions v1", (
        [e.row, int(e.label), len(e.prompt_ids), len(e.completion_ids), len(e.kl_completion_ids)] + e.prompt_ids
        + e.completion_ids + list(e.kl_completion_ids) for e in examples))


def unpair(pairs: Sequence[TokenizedPair]) -> List[TokenizedCompletion]:
    """Preference pairs as unpaired examples, as TRL's ``unpair_preference_dataset`` makes them:
    each pair's chosen response a desirable completion of its prompt and its rejected response an
    undesirable one, every chosen first, then every rejected, in the pairs' order."""
    return ([TokenizedCompletion(p.prompt_ids, p.chosen_ids, True, p.row) for p in pairs]
            + [TokenizedCompletion(p.prompt_ids, p.rejected_ids, False, p.row) for p in pairs])


def with_kl_completions(examples: Sequence[TokenizedCompletion], max_length: int) -> List[TokenizedCompletion]:
    """The examples, each with its KL completion: the completion of the nearest example before it
    (in data order, wrapping around) whose prompt differs, cut to the room ``max_length`` leaves
    after the prompt.

    KTO's reference point z0 estimates KL(policy || reference) on such mismatched (prompt,
    completion) pairs. TRL's KTOTrainer rotates the completions by one within each batch of its
    fixed-order data; here the mismatched pairing is fixed by the data, whatever the batches, so
    that the reference log-probs of the mismatched sequences are computed once and cached with the
    examples' own, and it never pairs a completion with its own prompt (a rotation would, in data
    grouped by prompt, such as a pair's two halves side by side).
    """
    _check_positive_int("max_length", max_length)
    prompts = [tuple(example.prompt_ids) for example in examples]
    count = len(examples)
    # source[i]: the nearest earlier example with another prompt; two passes around the circle so
    # that the first examples find theirs at the end
    source: List[Optional[int]] = [None] * count
    for step in range(2 * count):
        i, before = step % count, (step - 1) % count
        source[i] = before if prompts[before] != prompts[i] else source[before]
    if count and source[0] is None:
        raise ValueError("KTO's KL estimate needs completions of other prompts, but every example has the same "
                         "prompt: give examples of at least two prompts")
    return [dataclasses.replace(example, kl_completion_ids=examples[other].completion_ids[
        :max_length - len(example.prompt_ids)]) for example, other in zip(examples, source)]


def train_eval_split(
    examples: Sequence[TokenizedPair], eval_fraction: float, seed: int
) -> Tuple[List[TokenizedPair], List[TokenizedPair]]:
    """Split pairs into (train, eval), the same way for the same seed on any machine.

    Pairs are ranked by a hash of (seed, source row) and the first ``round(n * eval_fraction)`` (at
    least one when the fraction is positive) go to eval. Hashing instead of a random shuffle keeps
    the split independent of Python's RNG implementation; each part keeps the input order.
    """
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction!r}")
    eval_count = round(len(examples) * eval_fraction)
    if eval_fraction > 0:
        eval_count = max(eval_count, 1)
        if eval_count >= len(examples):
            raise ValueError(
                f"eval_fraction={eval_fraction} of {count_of(len(examples), 'pair')} leaves no pairs to train on"
            )

    def rank(position: int) -> Tuple[bytes, int]:
        key = f"{seed}:{examples[position].row}".encode()
        return hashlib.sha256(key).digest(), position

    eval_positions = set(sorted(range(len(examples)), key=rank)[:eval_count])
    train = [example for position, example in enumerate(examples) if position not in eval_positions]
    evaluation = [example for position, example in enumerate(examples) if position in eval_positions]
    return train, evaluation
