"""Iterative DPO (`fastpref train --rounds`): judges, pairing, the rounds, and their resumption."""
import json
import math
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fastpref.cli import main
from fastpref.train import data as data_module
from fastpref.train.distributed import Distributed
from fastpref.train.judges import PairwiseJudge, RewardFunction, RewardModel, load_judge, select_pairs
from fastpref.train.rounds import Rounds

ROUND_FLAGS = ["--max-length", "64", "--max-prompt-length", "40", "--max-new-tokens", "12", "--prompts-per-round", "6",
               "--heldout-prompts", "3", "--generations-per-prompt", "3", "--pairs-per-step", "4",
               "--num-train-epochs", "1", "--score-train-pairs", "0", "--no-progress"]


# -- judges ---------------------------------------------------------------------------------------

def word_count(prompts, completions):
    return [float(len(c.split())) for c in completions]


def test_a_reward_function_scores_every_completion_of_every_prompt():
    judge = RewardFunction(word_count, "m:word_count")
    assert judge.score(["p", "q"], [["a b", "a"], ["a b c"]]) == [[2.0, 1.0], [3.0]]

    def trl_style(completions, **kwargs):  # TRL's reward functions take the prompts as a keyword
        return [float(len(c)) + len(p) / 10 for c, p in zip(completions, kwargs["prompts"])]

    assert RewardFunction(trl_style, "m:trl_style").score(["pq"], [["abc", "d"]]) == [[3.2, 1.2]]


@pytest.mark.parametrize("returned, message", [
    ([1.0], r"judge m:bad returned 1 scores for 3 completions"),
    ([1.0, float("nan"), 2.0], r"returned nan for completion 1, of prompt 'p': scores must be finite"),
    ([1.0, "2", 2.0], r"returned '2' \(a str, not a number\) for completion 1"),
    ([1.0, None, 2.0], r"returned None \(a NoneType, not a number\)"),
    ([1.0, True, 2.0], r"returned True \(a bool, not a number\)"),
    (7.0, r"returned float, not a list of scores"),
])
def test_a_judge_returning_bad_scores_is_named(returned, message):
    judge = RewardFunction(lambda prompts, completions: returned, "m:bad")
    with pytest.raises(ValueError, match=message):
        judge.score(["p", "q"], [["a", "b"], ["c"]])


def test_a_pairwise_judge_scores_each_response_by_its_wins():
    class Longer:  # TRL's pairwise-judge interface: the index of the better completion of each pair
        def judge(self, prompts, completions, shuffle_order=True):
            return [int(len(b) > len(a)) if len(a) != len(b) else -1 for a, b in completions]

    judge = PairwiseJudge(Longer(), "m:longer")
    assert judge.score(["p", "q"], [["aaa", "a", "aa", "bb"], ["x"]]) == [[3.0, 0.0, 1.0, 1.0], [0.0]]


def test_load_judge_names_what_is_wrong(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_rewards.py").write_text("def length(prompts, completions):\n    return [1.0] * len(completions)\n"
                                             "class Referee:\n    def judge(self, prompts, completions):\n"
                                             "        return [0] * len(prompts)\nreferee = Referee()\nlimit = 3\n")
    assert isinstance(load_judge("my_rewards:length", torch.device("cpu")), RewardFunction)
    assert isinstance(load_judge("my_rewards:referee", torch.device("cpu")), PairwiseJudge)
    for spec, message in [(None, "--judge is required with --rounds"),
                          ("no_colon", "neither a folder nor module:function"),
                          ("missing_module_xyz:f", "cannot import missing_module_xyz"),
                          ("my_rewards:absent", "module my_rewards has no attribute absent"),
                          ("my_rewards:limit", "limit is neither a function nor an object with a judge method"),
                          (str(tmp_path), "is a folder without a config.json")]:
        with pytest.raises(ValueError, match=message):
            load_judge(spec, torch.device("cpu"))


def test_a_reward_model_judge_reads_text_with_its_own_tokenizer(tmp_path):
    """The reward model's tokenizer (here the embedded one, with its chat template) encodes the
    decoded text: the policy's token ids never reach it."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from fastpref.train.default_assets import default_tokenizer

    tokenizer = default_tokenizer()
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_labels=1, pad_token_id=tokenizer.pad_token_id))
    model.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    judge = load_judge(str(tmp_path / "rm"), torch.device("cpu"))
    assert isinstance(judge, RewardModel)
    scores = judge.score(["Is it late?", "Hi"], [["Yes, it is.", "No"], ["Hello there"]])
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Is it late?"},
                                          {"role": "assistant", "content": "No"}], tokenize=False)
    with torch.no_grad():
        expected = model.eval()(**tokenizer([text], return_tensors="pt", add_special_tokens=False)).logits[0, 0]
    assert [len(s) for s in scores] == [2, 1] and math.isclose(scores[0][1], float(expected), rel_tol=1e-5)


def test_select_pairs_best_against_worst_or_every_pair_past_the_margin():
    assert select_pairs([0.5, 2.0, -1.0, 2.0], "best_worst", 0.0) == [(1, 2)]
    assert select_pairs([1.0, 1.0, 1.0], "best_worst", 0.0) == []  # a tie makes no pair
    assert select_pairs([1.0, 1.2], "best_worst", 0.5) == []
    assert select_pairs([3.0, 1.0, 2.0], "margin", 0.5) == [(0, 1), (0, 2), (2, 1)]
    assert select_pairs([3.0, 1.0, 2.0], "margin", 1.5) == [(0, 1)]


def test_the_round_pairs_drop_ties_empty_and_repeated_responses():
    rounds = SimpleNamespace(cfg=SimpleNamespace(pair_selection="margin", score_margin=0.0), distributed=Distributed())
    judged = [{"prompt": "p", "completions": ["a", "", "b", "a"], "scores": [1.0, None, 0.0, 1.0]},
              {"prompt": "q", "completions": ["c", "d"], "scores": [2.0, 2.0]}]
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "pairs.jsonl"
        counts = Rounds._pairs(rounds, judged, path)
        rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert counts == {"pairs": 1, "prompts_without_pair": 1, "empty_generations": 1}
    assert rows == [{"prompt": "p", "chosen": "a", "rejected": "b", "score_chosen": 1.0, "score_rejected": 0.0}]


# -- the rounds -----------------------------------------------------------------------------------

def test_three_rounds_on_the_embedded_model(tmp_path, capsys):
    """Three rounds end to end; every round's files, pairs the trainer reads again, and a rerun that
    finds everything done."""
    command = ["train", "--rounds", "3", "--judge", "fastpref.rewards:brevity", "--output-dir", str(tmp_path / "run"),
               "--cache-dir", str(tmp_path / "cache"), "--pair-selection", "margin", "--prefix-sharing", *ROUND_FLAGS]
    assert main(command) == 0
    out = capsys.readouterr().out
    assert "the judge's scores by round:" in out and "  round 3: held-out score " in out
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2, 3]
    assert all(r["heldout/responses"] == 9 for r in records)
    assert records[0]["prompts_too_long"] == 0  # cut to max_prompt_length 40, every prompt leaves room for 12
    for record in records[1:]:
        directory = tmp_path / "run" / f"round-{record['round']}"
        assert record["prompts"] == 6 and record["pairs"] > 0
        generations = [json.loads(line) for line in (directory / "generations.jsonl").read_text().splitlines()]
        assert len(generations) == 6 and all(len(g["completions"]) == 3 for g in generations)
        assert all(len(g["prompt_ids"]) <= 40 and len(g["completion_ids"][0]) <= 12 for g in generations)
        rows = data_module.load_rows(str(directory / "pairs.jsonl"))
        assert len(rows) == record["pairs"]
        assert (directory / "train" / "final" / "config.json").is_file()
        assert not math.isnan(record["train/loss"])
    assert (tmp_path / "run" / "rounds.png").stat().st_size > 0
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert main(command) == 0
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before
    assert "== round" not in capsys.readouterr().out  # nothing ran again


def small_tokenizer(folder):
    """A byte-level BPE of 300 tokens, another vocabulary than the embedded model's 2,048."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(["Human: how are you? Assistant: fine, thank you."] * 10, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>")
    wrapped.save_pretrained(folder)
    return wrapped


def test_a_round_judged_by_a_reward_model_of_another_vocabulary(tmp_path, capsys):
    """The reward model reads the decoded text with its own 300-token vocabulary: a policy id (up to
    2,047) reaching it would fail its embedding. Prompts with no room for max_new_tokens are counted.
    TRL's per-device batch size reaches each round's training."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tokenizer = small_tokenizer(tmp_path / "rm")
    LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, num_labels=1, pad_token_id=tokenizer.pad_token_id)).save_pretrained(tmp_path / "rm")
    assert main(["train", "--rounds", "1", "--judge", str(tmp_path / "rm"), "--output-dir", str(tmp_path / "run"),
                 "--cache-dir", str(tmp_path / "cache"),
                 *[{"--pairs-per-step": "--per-device-train-batch-size"}.get(f, f) for f in ROUND_FLAGS[2:]],
                 "--max-length", "48",
                 "--max-prompt-length", "40"]) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["prompts_too_long"] > 0
    assert (f"{records[0]['prompts_too_long']} skipped as longer than 36 tokens once cut to max_prompt_length 40"
            in capsys.readouterr().out)
    judged = [json.loads(line) for line in (tmp_path / "run" / "round-1" / "judged.jsonl").read_text().splitlines()]
    scores = [score for record in judged for score in record["scores"] if score is not None]
    assert len(scores) >= 12 and len(set(scores)) > 1


def test_rounds_refuse_bad_settings(tmp_path, capsys):
    base = ["train", "--output-dir", str(tmp_path / "run"), *ROUND_FLAGS]
    assert main(base + ["--judge", "fastpref.rewards:brevity"]) == 2
    assert "judge ranks generated responses, which only --rounds makes" in capsys.readouterr().err
    assert main(base + ["--rounds", "1", "--judge", "fastpref.rewards:brevity", "--generations-per-prompt", "1"]) == 2
    assert "generations-per-prompt must be >= 2" in capsys.readouterr().err
    assert main(base + ["--rounds", "1"]) == 2
    assert "--judge is required with --rounds" in capsys.readouterr().err
    assert main(base + ["--rounds", "1", "--judge", "fastpref.rewards:brevity", "--temperature", "0"]) == 2
    assert "temperature must be > 0 (greedy decoding would give the K responses of a prompt alike" in \
        capsys.readouterr().err
    assert main(base + ["--rounds", "1", "--judge", "fastpref.rewards:brevity", "--max-new-tokens", "64"]) == 2
    assert "max-new-tokens (64) leaves no room for a prompt" in capsys.readouterr().err
    assert main(base + ["--rounds", "1", "--judge", "fastpref.rewards:brevity", "--heldout-prompts", "0"]) == 0
    assert "  round 1: no held-out prompts (--heldout-prompts 0), " in capsys.readouterr().out
    assert main(base + ["--rounds", "2", "--judge", "fastpref.rewards:brevity", "--heldout-prompts", "0"]) == 2
    assert "holds rounds run with other settings (rounds differ)" in capsys.readouterr().err


@pytest.mark.slow
def test_sigterm_mid_generation_resumes_to_the_same_responses(tmp_path):
    """A real SIGTERM while round 1 generates: exit 143 with what was saved, and the rerun finishes
    with the responses an uninterrupted run samples."""
    flags = ["--rounds", "1", "--judge", "fastpref.rewards:brevity", "--heldout-prompts", "0",
             "--generation-batch-size", "1", "--prompts-per-round", "40", "--max-new-tokens", "24",
             "--cache-dir", str(tmp_path / "cache"), *ROUND_FLAGS[:4], *ROUND_FLAGS[10:]]
    command = [sys.executable, "-m", "fastpref.cli", "train", "--output-dir", str(tmp_path / "run"), *flags]
    generations = tmp_path / "run" / "round-1" / "generations.jsonl"
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (generations.is_file() and len(generations.read_text().splitlines()) >= 2):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 143, err
    assert "stopped by SIGTERM (round 1: generating): " in err and "run the same command again" in err
    saved = generations.read_text().splitlines()
    assert 2 <= len(saved) < 40
    resumed = subprocess.run(command, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    lines = generations.read_text().splitlines()
    assert len(lines) == 40 and lines[:len(saved)] == saved
    assert main(["train", "--output-dir", str(tmp_path / "whole"), *flags]) == 0
    assert (tmp_path / "whole" / "round-1" / "generations.jsonl").read_text().splitlines() == lines


def test_generation_cut_mid_line_is_dropped_and_regenerated(tmp_path):
    """A kill can leave half a line: it is cut back, and the batch is sampled again."""
    from fastpref.train.rounds import read_whole_lines

    path = tmp_path / "g.jsonl"
    path.write_text('{"index": 0}\n{"index": 1}\n{"ind')
    assert read_whole_lines(path) == [{"index": 0}, {"index": 1}]
    assert path.read_text() == '{"index": 0}\n{"index": 1}\n'



def _rounds_worker(rank, world_size, port, argv, report):
    import os

    import torch.distributed as dist

    from test_distributed import exit_without_teardown

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size),
                      RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    code = main(argv)
    if rank == 0:
        Path(report).write_text(str(code))
    dist.barrier()
    exit_without_teardown()


@pytest.mark.slow
def test_two_processes_share_each_batch_of_generation_and_judging(tmp_path):
    """torchrun-style, 2 gloo processes: each generates and judges its share of every batch, the
    main process writes them in prompt order, and both train the round together."""
    import torch.multiprocessing as mp

    from test_distributed import _free_port

    argv = ["train", "--rounds", "1", "--judge", "fastpref.rewards:brevity", "--output-dir", str(tmp_path / "run"),
            "--cache-dir", str(tmp_path / "cache"), "--generation-batch-size", "2", *ROUND_FLAGS]
    report = tmp_path / "code"
    mp.spawn(_rounds_worker, args=(2, _free_port(), argv, str(report)), nprocs=2, join=True)
    assert report.read_text() == "0"
    generations = [json.loads(line) for line in (tmp_path / "run" / "round-1" / "judged.jsonl").read_text().splitlines()]
    assert [g["index"] for g in generations] == list(range(6))
    assert all(len(g["scores"]) == 3 for g in generations)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1] and records[1]["pairs"] > 0
    assert (tmp_path / "run" / "round-1" / "train" / "final" / "config.json").is_file()


def test_group_by_prompt_trains_the_same_pairs_as_the_pairs_one_by_one(tmp_path):
    """Three pairs per prompt among three responses: one step over every pair has the same loss
    and metrics grouped (each response once, the prompt once) as pair by pair; the held-out split
    keeps a prompt's pairs together."""
    from fastpref.train.loop import Trainer, train
    from test_trainer import config

    rows = [{"prompt": f"Question {i}: what is {i} plus {i}?", "chosen": f" {2 * i}.", "rejected": f" {2 * i + 1}."}
            for i in range(6)]
    rows = [dict(row, **pair) for row in rows for pair in (
        {}, {"rejected": " I do not know."}, {"chosen": row["rejected"], "rejected": " I do not know."})]
    data = tmp_path / "triples.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    results = {}
    for grouped in (False, True):
        result = train(config(tmp_path / str(grouped), str(data), group_by_prompt=grouped, prefix_sharing=grouped,
                              pairs_per_step=18, max_steps=1, eval_fraction=0.0, score_train_pairs=0))
        results[grouped] = result
    assert results[True].losses == pytest.approx(results[False].losses, rel=1e-6)
    trainer = Trainer(config(tmp_path / "split", str(data), group_by_prompt=True, eval_fraction=0.34))
    assert len(trainer.train_pairs) == 4 and len(trainer.eval_pairs) == 2
    assert all(len(group.responses) == 3 and len(group.pairs) == 3 for group in trainer.train_pairs)
    held_out = {tuple(group.prompt_ids) for group in trainer.eval_pairs}
    assert not held_out & {tuple(group.prompt_ids) for group in trainer.train_pairs}
