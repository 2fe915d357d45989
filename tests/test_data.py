"""Preference data: loading, the three formats, malformed rows, truncation, fingerprint, default assets."""
from __future__ import annotations

import gzip
import json

import pytest
import torch

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

from fastpref.train import default_assets  # noqa: E402
from fastpref.train.data import (
    TokenizedPair,
    fingerprint_pairs,
    load_rows,
    tokenize_pairs,
    train_eval_split,
)
from fastpref.train.default_assets import default_model, default_model_config, default_tokenizer

EXPLICIT_ROWS = [
    {"prompt": "\n\nHuman: What is two plus two?\n\nAssistant:", "chosen": " Four.", "rejected": " Five."},
    {"prompt": "\n\nHuman: Name a colour.\n\nAssistant:", "chosen": " Blue.", "rejected": " A number."},
    {"prompt": "\n\nHuman: Say hi.\n\nAssistant:", "chosen": " Hi!", "rejected": " No."},
]

# Role header before each message, end of turn after it; the generation prompt is the assistant header.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|eos|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# A template whose generation prompt ends in a newline that rendered assistant messages lack.
NON_EXTENDING_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|eos|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# The sample's malformed rows: two whose chosen dialogue is the rejected one's beginning.
SAMPLE_MALFORMED = {"empty chosen response": [69, 406]}
NO_TRUNCATION = dict(max_length=10**6, max_prompt_length=10**6)


@pytest.fixture(scope="module")
def tokenizer():
    return default_tokenizer()


@pytest.fixture(scope="module")
def chat_tokenizer():
    tokenizer = default_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def write_jsonl(path, rows, *, compress=False):
    text = "".join(json.dumps(row) + "\n" for row in rows)
    if compress:
        with gzip.open(path, "wt", encoding="utf-8") as stream:
            stream.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def texts(tokenizer, example: TokenizedPair):
    """Decode a pair back to text, without the BOS and EOS tokenize_pairs added."""
    assert example.prompt_ids[0] == tokenizer.bos_token_id
    assert example.chosen_ids[-1] == tokenizer.eos_token_id
    assert example.rejected_ids[-1] == tokenizer.eos_token_id
    return (
        tokenizer.decode(example.prompt_ids[1:]),
        tokenizer.decode(example.chosen_ids[:-1]),
        tokenizer.decode(example.rejected_ids[:-1]),
    )


# ------------------------------------------------------------------------------------------ loading


def test_bundled_sample_loads():
    rows = load_rows(None)
    assert rows.column_names == ["chosen", "rejected"]
    assert rows.num_rows == 517
    assert rows[0]["chosen"].startswith("\n\nHuman: ")


def test_explicit_rows_load_the_same_from_every_source(tmp_path, tokenizer):
    records = [dict(row) for row in EXPLICIT_ROWS]
    (tmp_path / "rows.json").write_text(json.dumps(records), encoding="utf-8")
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "rows.parquet")
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(records[:1]), "test": datasets.Dataset.from_list(records)}
    ).save_to_disk(str(tmp_path / "saved_dict"))
    sources = [
        (write_jsonl(tmp_path / "rows.jsonl", records), None),
        (write_jsonl(tmp_path / "rows.jsonl.gz", records, compress=True), None),
        (tmp_path / "rows.json", None),
        (tmp_path / "rows.parquet", None),
        (tmp_path / "saved", None),
        (str(tmp_path / "saved_dict"), "test"),
    ]
    expected, report = tokenize_pairs(records, tokenizer)
    assert report.format == "explicit" and report.pairs_kept == 3 and not report.skipped
    for example, row in zip(expected, EXPLICIT_ROWS):
        assert texts(tokenizer, example) == (row["prompt"], row["chosen"], row["rejected"])
    for source, split in sources:
        rows = load_rows(source, split=split)
        assert isinstance(rows, datasets.Dataset)
        examples, _ = tokenize_pairs(rows, tokenizer)
        assert examples == expected, source
    assert load_rows(tmp_path / "saved_dict").num_rows == 1  # the default split is "train"


def test_load_rows_rejects_what_it_cannot_read_locally(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a local file or directory: 'Anthropic/hh-rlhf'"):
        load_rows("Anthropic/hh-rlhf")
    (tmp_path / "rows.csv").write_text("prompt,chosen,rejected\n", encoding="utf-8")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_rows(tmp_path / "rows.csv")
    with pytest.raises(FileNotFoundError, match="not a data set written by"):
        load_rows(tmp_path)
    saved_dict = datasets.DatasetDict({"train": datasets.Dataset.from_list(EXPLICIT_ROWS)})
    saved_dict.save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match=r"split='validation' is not in .*'train'"):
        load_rows(tmp_path / "dd", split="validation")
    jsonl = write_jsonl(tmp_path / "rows.jsonl", EXPLICIT_ROWS)
    with pytest.raises(ValueError, match="only applies to a saved DatasetDict"):
        load_rows(jsonl, split="train")
    write_jsonl(tmp_path / "mixed.jsonl", [EXPLICIT_ROWS[0], dict(EXPLICIT_ROWS[1], chosen=7)])
    with pytest.raises(ValueError, match="column 'chosen' mixes kinds of value"):
        load_rows(tmp_path / "mixed.jsonl")


def test_jsonl_lines_split_only_at_newlines(tmp_path, tokenizer):
    row = {"prompt": "Q\u2028", "chosen": " line\u2029separators", "rejected": " plain"}
    (tmp_path / "rows.jsonl").write_text(json.dumps(row, ensure_ascii=False) + "\r\n", encoding="utf-8")
    rows = load_rows(tmp_path / "rows.jsonl")
    assert rows.num_rows == 1 and rows[0] == row


def test_rows_must_hold_preference_columns(tokenizer):
    with pytest.raises(ValueError, match="no 'rejected' column"):
        tokenize_pairs([{"prompt": "a", "chosen": "b"}], tokenizer)
    with pytest.raises(ValueError, match="format='explicit' needs a 'prompt' column"):
        tokenize_pairs([{"chosen": "a", "rejected": "b"}], tokenizer, format="explicit")
    with pytest.raises(TypeError, match="DatasetDict"):
        tokenize_pairs(datasets.DatasetDict({"train": datasets.Dataset.from_list(EXPLICIT_ROWS)}), tokenizer)
    with pytest.raises(ValueError, match="format must be one of"):
        tokenize_pairs(EXPLICIT_ROWS, tokenizer, format="chatml")


# ----------------------------------------------------------------------------------------- formats


def test_implicit_split_of_the_bundled_sample_reconstructs_each_dialogue(tokenizer):
    rows = load_rows(None)
    examples, report = tokenize_pairs(rows, tokenizer, **NO_TRUNCATION)
    assert report.format == "implicit"
    assert report.skipped == SAMPLE_MALFORMED
    assert report.rows_read == 517 and report.pairs_kept == 515 == len(examples)
    at_the_last_turn = 0
    for example in examples:
        prompt, chosen, rejected = texts(tokenizer, example)
        assert prompt + chosen == rows[example.row]["chosen"]
        assert prompt + rejected == rows[example.row]["rejected"]
        assert chosen[0] != rejected[0] or chosen[0] == " " and chosen[1] != rejected[1]
        at_the_last_turn += prompt.endswith("\n\nAssistant:")
    assert at_the_last_turn > 0.8 * len(examples)


def test_implicit_prompts_are_the_longest_common_prefix_as_trl_extracts_them(tokenizer):
    dialogue = "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: How are you?\n\nAssistant:"
    rows = [
        {"chosen": dialogue + " Fine.", "rejected": dialogue + " Go away."},
        # no HH markers: a plain shared prefix is the prompt
        {"chosen": "The capital of France is Paris.", "rejected": "The capital of France is Lyon."},
        # the cut may fall inside a word, as TRL's does; a space just before the difference is a response's
        {"chosen": "Q: 2+2? A: it is four", "rejected": "Q: 2+2? A: it is five"},
        {"chosen": dialogue + " Same.", "rejected": dialogue + " Same."},
        {"chosen": dialogue + " Fine.", "rejected": dialogue + " "},
        {"chosen": dialogue, "rejected": dialogue + " More."},
    ]
    examples, report = tokenize_pairs(rows, tokenizer)
    assert [example.row for example in examples] == [0, 1, 2]
    assert [texts(tokenizer, example) for example in examples] == [
        (dialogue, " Fine.", " Go away."),
        ("The capital of France is", " Paris.", " Lyon."),
        ("Q: 2+2? A: it is f", "our", "ive"),
    ]
    assert report.skipped == {"chosen == rejected": [3], "empty rejected response": [4],
                              "empty chosen response": [5]}


def test_conversational_prompt_plus_responses_and_full_conversations_agree(chat_tokenizer):
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    chosen = [{"role": "assistant", "content": "Hello!"}]
    rejected = [{"role": "assistant", "content": "Go away."}]
    with_prompt, report = tokenize_pairs(
        [{"prompt": prompt, "chosen": chosen, "rejected": rejected}], chat_tokenizer
    )
    assert report.format == "conversational"
    full, report = tokenize_pairs(
        [{"chosen": prompt + chosen, "rejected": prompt + rejected}], chat_tokenizer
    )
    assert report.format == "conversational"
    assert with_prompt == full
    (example,) = full
    eos = chat_tokenizer.eos_token_id
    assert chat_tokenizer.decode(example.prompt_ids[1:]) == (
        "<|system|>Be brief.<|eos|><|user|>Hi there<|eos|><|assistant|>"
    )
    # The template's own end of turn is the EOS token: it is not appended a second time.
    assert chat_tokenizer.decode(example.chosen_ids) == "Hello!<|eos|>"
    assert example.chosen_ids[-1] == eos and example.chosen_ids[-2] != eos
    assert chat_tokenizer.decode(example.rejected_ids) == "Go away.<|eos|>"


def test_conversational_rows_from_a_saved_dataset(tmp_path, chat_tokenizer):
    rows = [
        {"prompt": [{"role": "user", "content": f"Question {i}"}],
         "chosen": [{"role": "assistant", "content": f"Good answer {i}"}],
         "rejected": [{"role": "assistant", "content": f"Bad answer {i}"}]}
        for i in range(3)
    ]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "chat"))
    examples, report = tokenize_pairs(load_rows(tmp_path / "chat"), chat_tokenizer)
    assert report.format == "conversational" and report.pairs_kept == 3
    assert chat_tokenizer.decode(examples[2].chosen_ids) == "Good answer 2<|eos|>"


def test_conversational_rows_that_cannot_be_split_are_reported(chat_tokenizer):
    user, other_user = {"role": "user", "content": "Hi"}, {"role": "user", "content": "Hey"}
    hello, no = {"role": "assistant", "content": "Hello"}, {"role": "assistant", "content": "No"}
    rows = [
        {"chosen": [user, hello], "rejected": [user, no]},
        {"chosen": [user], "rejected": [user, no]},
        {"chosen": [other_user, hello], "rejected": [user, no]},
        {"chosen": [user, {"role": "assistant", "content": "  "}], "rejected": [user, no]},
        {"chosen": [user, {"role": "assistant"}], "rejected": [user, no]},
    ]
    examples, report = tokenize_pairs(rows, chat_tokenizer)
    assert [example.row for example in examples] == [0]
    assert report.skipped == {
        "chosen does not end with an assistant message": [1],
        "implicit prompt mismatch": [2],
        "empty chosen response": [3],
        "'chosen' is not a list of role/content messages": [4],
    }


def test_chat_template_problems_are_malformed_rows():
    rows = [{"chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
             "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "No"}]}]
    tokenizer = default_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="needs a tokenizer with a chat_template"):
        tokenize_pairs(rows, tokenizer)
    tokenizer.chat_template = NON_EXTENDING_TEMPLATE
    examples, report = tokenize_pairs(rows, tokenizer)
    assert not examples and report.skipped == {"chat template does not extend the prompt": [0]}
    tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}"
    examples, report = tokenize_pairs(rows, tokenizer)
    assert not examples and report.skipped == {"chat template error": [0]}


# ------------------------------------------------------------------------------------ malformed rows


MALFORMED_EXPLICIT_ROWS = [
    EXPLICIT_ROWS[0],
    {"prompt": "Q", "chosen": " A"},
    {"prompt": "Q", "chosen": 5, "rejected": " B"},
    {"prompt": "Q", "chosen": "   ", "rejected": " B"},
    {"prompt": "Q", "chosen": " A", "rejected": "\n"},
    {"prompt": "Q", "chosen": " A", "rejected": " A"},
    EXPLICIT_ROWS[1],
    "not a row",
    {"prompt": None, "chosen": " A", "rejected": " B"},
]
MALFORMED_EXPLICIT_REASONS = {
    "missing 'rejected'": [1],
    "'chosen' is not a string": [2],
    "empty chosen response": [3],
    "empty rejected response": [4],
    "chosen == rejected": [5],
    "row is not a mapping": [7],
    "missing 'prompt'": [8],
}


def test_malformed_rows_are_skipped_and_reported_by_row_and_reason(tokenizer):
    examples, report = tokenize_pairs(MALFORMED_EXPLICIT_ROWS, tokenizer)
    assert [example.row for example in examples] == [0, 6]
    assert report.skipped == MALFORMED_EXPLICIT_REASONS
    assert report.rows_read == 9 and report.pairs_kept == 2 and report.rows_skipped == 7
    summary = report.summary()
    assert "9 rows read (explicit format): 2 pairs kept, 7 rows skipped" in summary
    assert "skipped (missing 'rejected'): 1 row: 1" in summary
    assert summary.count("row N of a JSONL file is its line N + 1") == 1
    assert report.to_dict()["skipped"] == MALFORMED_EXPLICIT_REASONS


def test_a_missing_key_in_a_jsonl_file_is_a_malformed_row(tmp_path, tokenizer):
    rows = [EXPLICIT_ROWS[0], {"prompt": "Q", "chosen": " A"}, EXPLICIT_ROWS[2]]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    examples, report = tokenize_pairs(load_rows(path), tokenizer)
    assert [example.row for example in examples] == [0, 2]
    assert report.skipped == {"missing 'rejected'": [1]}


def test_unreadable_json_lines_are_malformed_rows_numbered_like_the_others(tmp_path, tokenizer):
    lines = [json.dumps(EXPLICIT_ROWS[0]), "{not json", "", "[1, 2]", json.dumps(EXPLICIT_ROWS[1])]
    (tmp_path / "rows.jsonl").write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    examples, report = tokenize_pairs(load_rows(tmp_path / "rows.jsonl"), tokenizer)
    # row N is line N + 1: the bad lines 2, 3 and 4 are rows 1, 2 and 3
    assert [example.row for example in examples] == [0, 4]
    assert report.skipped == {"not valid JSON": [1], "blank line": [2], "a JSON list, not an object": [3]}
    with pytest.raises(ValueError, match=r"3 malformed rows \(row 1: not valid JSON; row 2: blank line"):
        tokenize_pairs(load_rows(tmp_path / "rows.jsonl"), tokenizer, on_malformed="error")


def test_an_empty_file_is_called_empty(tmp_path, tokenizer):
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match="the data is empty: it holds no rows"):
        tokenize_pairs(load_rows(tmp_path / "empty.jsonl"), tokenizer)


def test_on_malformed_error_lists_the_first_rows(tokenizer):
    with pytest.raises(ValueError) as raised:
        tokenize_pairs(MALFORMED_EXPLICIT_ROWS, tokenizer, on_malformed="error")
    message = str(raised.value)
    assert message.startswith("7 malformed rows (row 1: missing 'rejected'; row 2: 'chosen' is not a string;")
    assert ("row 5: chosen == rejected; and 2 more; rows are counted from 0: row N of a JSONL file is its "
            "line N + 1)") in message
    assert "on_malformed='skip'" in message
    examples, _ = tokenize_pairs(EXPLICIT_ROWS, tokenizer, on_malformed="error")
    assert len(examples) == 3
    with pytest.raises(ValueError, match="on_malformed must be one of"):
        tokenize_pairs(EXPLICIT_ROWS, tokenizer, on_malformed="warn")


def test_a_prompt_of_no_tokens_is_malformed_without_bos(tokenizer):
    rows = [{"prompt": "", "chosen": "Yes", "rejected": "No"}]
    examples, report = tokenize_pairs(rows, tokenizer, add_bos=False)
    assert not examples and report.skipped == {"empty prompt": [0]}
    (example,), _ = tokenize_pairs(rows, tokenizer)
    assert example.prompt_ids == [tokenizer.bos_token_id]
    # Found after tokenising, yet listed in row order with the rows found while splitting.
    rows.append({"prompt": "Q", "chosen": "A"})
    in_row_order = r"^2 malformed rows \(row 0: empty prompt; row 1: missing 'rejected'; rows are counted from 0"
    with pytest.raises(ValueError, match=in_row_order):
        tokenize_pairs(rows, tokenizer, add_bos=False, on_malformed="error")


# ---------------------------------------------------------------------------------------- truncation


@pytest.fixture(scope="module")
def long_pair(tokenizer):
    """One explicit row and its untruncated token ids (BOS and EOS included)."""
    row = {
        "prompt": "".join(f" prompt word {i}." for i in range(30)),
        "chosen": "".join(f" chosen word {i}." for i in range(30)),
        "rejected": " short.",
    }
    (example,), _ = tokenize_pairs([row], tokenizer, **NO_TRUNCATION)
    assert len(example.prompt_ids) > 60 and len(example.chosen_ids) > 60 and len(example.rejected_ids) < 10
    return row, example


def test_keep_end_cuts_the_prompt_start_but_keeps_bos(tokenizer, long_pair):
    row, full = long_pair
    (example,), report = tokenize_pairs([row], tokenizer, max_length=50, max_prompt_length=20)
    assert example.prompt_ids == full.prompt_ids[:1] + full.prompt_ids[-19:]
    assert example.chosen_ids == full.chosen_ids[:30]
    assert example.rejected_ids == full.rejected_ids
    assert report.truncation_mode == "keep_end"
    assert (report.prompts_truncated, report.responses_truncated) == (1, 1)
    assert (
        "truncation keep_end to 50 tokens, prompt to 20: 1 prompt cut, 1 pair with a response cut"
        in report.summary()
    )


def test_keep_start_cuts_the_prompt_end(tokenizer, long_pair):
    row, full = long_pair
    (example,), report = tokenize_pairs(
        [row], tokenizer, max_length=50, max_prompt_length=20, truncation_mode="keep_start"
    )
    assert example.prompt_ids == full.prompt_ids[:20]
    assert example.chosen_ids == full.chosen_ids[:30]
    assert report.truncation_mode == "keep_start"
    assert (report.prompts_truncated, report.responses_truncated) == (1, 1)


def test_only_pairs_longer_than_max_length_are_cut(tokenizer, long_pair):
    row, full = long_pair
    fitting = len(full.prompt_ids) + len(full.chosen_ids)
    (example,), report = tokenize_pairs([row], tokenizer, max_length=fitting, max_prompt_length=10)
    assert example == full
    assert report.prompts_truncated == report.responses_truncated == 0
    # Over by one token: the prompt cut alone makes room, so no response is cut.
    (example,), report = tokenize_pairs([row], tokenizer, max_length=fitting - 1, max_prompt_length=10)
    assert example.chosen_ids == full.chosen_ids and len(example.prompt_ids) == 10
    assert (report.prompts_truncated, report.responses_truncated) == (1, 0)


def test_a_response_truncated_away_is_malformed(tokenizer, long_pair):
    row, _ = long_pair
    examples, report = tokenize_pairs([row], tokenizer, max_length=16, max_prompt_length=16)
    assert not examples and report.skipped == {"response truncated away": [0]}
    with pytest.raises(ValueError, match="truncation_mode must be one of"):
        tokenize_pairs([row], tokenizer, truncation_mode="keep_middle")
    with pytest.raises(ValueError, match="max_length must be a positive int"):
        tokenize_pairs([row], tokenizer, max_length=0)


# ---------------------------------------------------------------------------- fingerprint and split


def test_fingerprint_is_stable_and_sensitive_to_every_token(tokenizer):
    examples, _ = tokenize_pairs(load_rows(None), tokenizer)
    again, _ = tokenize_pairs(load_rows(None), tokenizer)
    reference = fingerprint_pairs(examples)
    assert fingerprint_pairs(again) == reference and len(reference) == 64
    changed = list(examples)
    first = changed[0]
    one_token_changed = first.chosen_ids[:-1] + [first.chosen_ids[-1] + 1]
    changed[0] = TokenizedPair(first.prompt_ids, one_token_changed, first.rejected_ids, first.row)
    assert fingerprint_pairs(changed) != reference
    changed[0] = TokenizedPair(first.prompt_ids, first.chosen_ids, first.rejected_ids, first.row + 1000)
    assert fingerprint_pairs(changed) != reference
    boundary_a = [TokenizedPair([1, 2], [3], [4], 0)]
    boundary_b = [TokenizedPair([1], [2, 3], [4], 0)]
    assert fingerprint_pairs(boundary_a) != fingerprint_pairs(boundary_b)


def test_train_eval_split_is_deterministic_and_disjoint():
    examples = [TokenizedPair([0], [row], [row + 1], row) for row in range(100)]
    train, evaluation = train_eval_split(examples, 0.1, seed=3)
    assert len(evaluation) == 10 and len(train) == 90
    assert sorted(example.row for example in train + evaluation) == list(range(100))
    assert [example.row for example in train] == sorted(example.row for example in train)
    assert train_eval_split(examples, 0.1, seed=3) == (train, evaluation)
    assert train_eval_split(examples, 0.1, seed=4)[1] != evaluation
    assert train_eval_split(examples, 0.0, seed=3) == (examples, [])
    assert len(train_eval_split(examples[:5], 0.01, seed=0)[1]) == 1
    with pytest.raises(ValueError, match="eval_fraction must be in"):
        train_eval_split(examples, 1.0, seed=0)
    with pytest.raises(ValueError, match="leaves no pairs to train on"):
        train_eval_split(examples[:1], 0.5, seed=0)


# ---------------------------------------------------------------------------------- default assets


def test_default_tokenizer_is_deterministic_and_round_trips_text():
    first = default_tokenizer()
    default_assets._trained_tokenizer_json.cache_clear()
    second = default_tokenizer()
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()
    assert len(first) == 2048
    assert (first.bos_token, first.eos_token, first.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    unusual = "\n\nHuman: Héllo, wörld! 你好 🤗\n\nAssistant:  two  spaces\ttab"
    for text in [unusual, load_rows(None)[3]["chosen"]]:
        ids = first(text, add_special_tokens=False)["input_ids"]
        assert first.decode(ids) == text
    second.chat_template = CHAT_TEMPLATE
    assert default_tokenizer().chat_template == default_assets.CHAT_TEMPLATE  # each call gets its own wrapper


def test_default_model_is_a_seeded_tiny_llama(tokenizer):
    config = default_model_config(2048)
    assert (config.hidden_size, config.num_hidden_layers) == (128, 2)
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    assert (config.intermediate_size, config.max_position_embeddings) == (256, 1024)
    assert config.tie_word_embeddings is False
    torch.manual_seed(123)
    caller_state = torch.random.get_rng_state()
    model = default_model(tokenizer, seed=0)
    assert torch.equal(torch.random.get_rng_state(), caller_state)
    same = default_model(tokenizer, seed=0)
    other = default_model(tokenizer, seed=1)
    weight = model.model.embed_tokens.weight
    assert weight.dtype == torch.float32 and weight.shape == (2048, 128)
    assert torch.equal(weight, same.model.embed_tokens.weight)
    assert not torch.equal(weight, other.model.embed_tokens.weight)
    assert model.config.eos_token_id == tokenizer.eos_token_id
    logits = model(torch.tensor([[tokenizer.bos_token_id, 5, 6]])).logits
    assert logits.shape == (1, 3, 2048)
