"""Iterative DPO: the policy writes, a judge ranks, fastpref trains -- round after round.

``fastpref train --rounds R --judge JUDGE`` runs, for r = 1 .. R:

1. **generate**: the policy of round r - 1 (the starting model for r = 1) samples K responses to
   each of the round's P prompts (drawn in turn from the data's prompts, a held-out set apart);
2. **judge**: the judge scores each prompt's responses (:mod:`fastpref.train.judges`);
3. **pair**: the best against the worst of each prompt (or every pair of scores further apart than
   ``--score-margin``); ties and empty responses make no pair and are counted;
4. **train**: one DPO run of ``fastpref train`` on the round's pairs, a prompt's responses one
   group (each response computed once for every pair it is in, the prompt once with
   ``--prefix-sharing``); the reference is the starting model, or the round's own starting policy
   (``--round-reference previous``);
5. **held-out**: the new policy answers the held-out prompts, never trained on, and the judge scores
   them: the number that says whether the rounds help. Round 0 is the starting model's score.

Everything lands under ``OUTPUT_DIR/round-r/``: ``generations.jsonl`` and ``judged.jsonl`` (written
batch by batch), ``pairs.jsonl`` (prompt/chosen/rejected text: ``fastpref train --data`` reads it
again), the round's training run in ``train/``, ``heldout.jsonl`` and ``round.json``; the rounds'
metrics in ``OUTPUT_DIR/metrics.jsonl`` and ``rounds.png``. Every phase resumes where it stopped:
the same command after SIGTERM, SIGUSR1 or Ctrl-C picks up mid-generation, mid-judging or from the
round's last checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from . import data as data_module
from .config import TrainConfig
from .distributed import Distributed
from .generation import Sampling, batch_seed, sample
from .judges import Judge, load_judge, select_pairs
from .monitor import read_metrics
from .loop import FINAL_DIR, device_and_dtype, load_tokenizer, make_writable_dir, with_local_models, train
from .quiet import transformers_progress_bars_off
from .signals import StopRequests, TrainingInterrupted, signal_name
from .wording import count_of

INITIAL_MODEL_DIR = "initial-model"
SETTINGS_FILE = "rounds-settings.json"
ROUND_FILE = "round.json"
# what makes two runs' rounds the same: resuming under other settings is refused
ROUND_SETTINGS = ("model", "data", "seed", "rounds", "generations_per_prompt", "prompts_per_round",
                  "heldout_prompts", "temperature", "top_p", "max_new_tokens", "judge", "pair_selection",
                  "score_margin", "round_reference", "max_length", "max_prompt_length")


@dataclass
class RoundsResult:
    output_dir: Path
    rounds: List[Dict]  # one record per round, round 0 the starting model's held-out score
    metrics_path: Path
    plot_path: Optional[Path]
    model_path: Path


def _write_atomically(path: Path, text: str) -> None:
    staging = path.with_name(path.name + ".partial")
    staging.write_text(text)
    os.replace(staging, path)


def read_whole_lines(path: Path) -> List[Dict]:
    """The complete lines of `path` (a line cut short by a kill is dropped, and the file cut back to
    the complete ones, so that appending goes on from there)."""
    if not path.is_file():
        return []
    records, kept = [], 0
    with open(path, "rb") as handle:
        for line in handle:
            if not line.endswith(b"\n"):
                break
            records.append(json.loads(line))
            kept += len(line)
    if kept != path.stat().st_size:
        with open(path, "r+b") as handle:
            handle.truncate(kept)
    return records


def _append_jsonl(path: Path, records: Sequence[Dict]) -> None:
    with open(path, "a") as handle:
        handle.write("".join(json.dumps(record) + "\n" for record in records))
        handle.flush()
        os.fsync(handle.fileno())


def _score_summary(scores: Sequence[float]) -> Tuple[float, float]:
    return (statistics.fmean(scores), statistics.pstdev(scores)) if scores else (math.nan, math.nan)


class Rounds:
    """A rounds run's state; :func:`run_rounds` is the entry point."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg = cfg.resolved(Distributed.environment_world_size())
        if cfg.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {cfg.rounds}")
        for name in ("prompts_per_round", "generation_batch_size"):
            if getattr(cfg, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
        if cfg.heldout_prompts < 0:
            raise ValueError(f"heldout_prompts must be >= 0, got {cfg.heldout_prompts}")
        if cfg.score_margin < 0:
            raise ValueError(f"score_margin must be >= 0, got {cfg.score_margin}")
        self.sampling = Sampling(cfg.generations_per_prompt, cfg.max_new_tokens, cfg.temperature, cfg.top_p)
        self.sampling.check()
        if cfg.generations_per_prompt < 2:
            raise ValueError("generations_per_prompt must be >= 2: a pair needs two responses to a prompt")
        if cfg.max_new_tokens >= cfg.max_length:
            raise ValueError(f"max_new_tokens ({cfg.max_new_tokens}) leaves no room for a prompt in max_length "
                             f"({cfg.max_length})")
        self.output_dir = Path(cfg.output_dir)
        created = not self.output_dir.exists()
        make_writable_dir(self.output_dir)
        self.distributed = Distributed.from_environment(cfg.device)
        try:
            self._start()
        except BaseException:
            if created and self.distributed.is_main:  # a failed start leaves nothing behind
                shutil.rmtree(self.output_dir, ignore_errors=True)
            raise

    def _start(self) -> None:
        cfg = self.cfg
        self._check_settings()
        self.device, self.dtype = device_and_dtype(cfg, self.distributed)
        self.judge: Judge = load_judge(cfg.judge, self.device)
        local = with_local_models(cfg)
        self.tokenizer = load_tokenizer(local)
        self.initial_model = self._initial_model(local.model)
        self._load_prompts()
        # written once the run is known to start: a refused one leaves nothing to compare with
        if self.distributed.is_main:
            _write_atomically(self.output_dir / SETTINGS_FILE, json.dumps(self.settings, indent=1))
        self.distributed.barrier()

    def _check_settings(self) -> None:
        settings = {name: getattr(self.cfg, name) for name in ROUND_SETTINGS}
        path = self.output_dir / SETTINGS_FILE
        if path.is_file():
            found = json.loads(path.read_text())
            differing = sorted(name for name in settings if found.get(name) != settings[name])
            if differing:
                raise ValueError(f"--output-dir {self.output_dir} holds rounds run with other settings ("
                                 f"{', '.join(differing)} differ): use another --output-dir")
        self.settings = settings

    def _initial_model(self, model: Optional[str]) -> str:
        """The starting model's folder: the model given, or the embedded one, saved once."""
        if model is not None:
            return model
        folder = self.output_dir / INITIAL_MODEL_DIR
        if self.distributed.is_main and not (folder / "config.json").is_file():
            from .default_assets import default_model

            with transformers_progress_bars_off():
                default_model(self.tokenizer, self.cfg.seed).save_pretrained(folder)
            self.tokenizer.save_pretrained(folder)
        self.distributed.barrier()
        return str(folder)

    def _say(self, text: str) -> None:
        if self.distributed.is_main:
            tqdm.write(text)

    # -- prompts ----------------------------------------------------------------------------------
    def _load_prompts(self) -> None:
        """The data's distinct prompts (token ids, as the trainer tokenizes them), the held-out ones
        apart. A prompt that leaves no room for max_new_tokens within max_length is cut to
        max_prompt_length (as the trainer cuts one whose response does not fit); one that still
        leaves none is skipped and counted."""
        cfg = self.cfg
        rows = data_module.load_rows(cfg.data, split=cfg.split)
        options = dict(max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                       truncation_mode=cfg.truncation_mode, on_malformed=cfg.on_malformed, format=cfg.data_format)
        if data_module.is_unpaired(rows):
            examples, report = data_module.tokenize_unpaired(rows, self.tokenizer, **options)
        else:
            examples, report = data_module.tokenize_pairs(rows, self.tokenizer, **options)
        room = cfg.max_length - cfg.max_new_tokens
        # cut as the trainer cuts a prompt whose response would not fit: to max_prompt_length
        bos = self.tokenizer.bos_token_id
        prompts = list(dict.fromkeys(
            tuple(data_module.cut_prompt(example.prompt_ids, cfg.max_prompt_length, cfg.truncation_mode == "keep_end",
                                         bos) if len(example.prompt_ids) > room else example.prompt_ids)
            for example in examples))
        self.prompts_too_long = sum(len(prompt) > room for prompt in prompts)
        prompts = [list(prompt) for prompt in prompts if len(prompt) <= room]
        if len(prompts) <= cfg.heldout_prompts:
            raise ValueError(f"the data has {count_of(len(prompts), 'usable prompt')} ({self.prompts_too_long} "
                             f"longer than max_length - max_new_tokens = {room} tokens): not more than "
                             f"heldout_prompts = {cfg.heldout_prompts}")
        order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
        self.heldout = [prompts[i] for i in order[:cfg.heldout_prompts]]
        self.pool = [prompts[i] for i in order[cfg.heldout_prompts:]]
        self._say(f"rounds: {count_of(len(self.pool), 'training prompt')}, {len(self.heldout)} held out (never "
                  f"trained on), {self.prompts_too_long} skipped as longer than {room} tokens once cut to "
                  f"max_prompt_length {cfg.max_prompt_length} ({report.rows_skipped} malformed rows skipped)")

    def round_prompts(self, round_number: int) -> List[List[int]]:
        """Round r's prompts: the next P of the training prompts, in turn (around again when they run out)."""
        per_round = self.cfg.prompts_per_round
        start = (round_number - 1) * per_round
        return [self.pool[(start + i) % len(self.pool)] for i in range(min(per_round, len(self.pool)))]

    def text(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # -- phases -----------------------------------------------------------------------------------
    def _load_policy(self, folder: str):
        from transformers import AutoModelForCausalLM

        with transformers_progress_bars_off():
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=self.dtype, local_files_only=True)
        return model.to(self.device).eval()

    def _batches(self, items: List, path: Path, description: str, stop: StopRequests,
                 work: Callable[[List, int], List[Dict]]) -> List[Dict]:
        """One record per item, appended to `path` a batch at a time: each process computes its share
        of a batch (``work(share, batch_start)``, in the order of the share), the main process writes
        them. A resumed call keeps the whole batches `path` holds and goes on after them; SIGTERM or
        SIGUSR1 stops it after the batch at hand."""
        group = self.distributed
        batch = self.cfg.generation_batch_size * group.world_size
        done = group.broadcast_object(read_whole_lines(path) if group.is_main else None)
        if len(done) < len(items) and len(done) % batch:
            done = done[:len(done) - len(done) % batch]  # a batch cut short is computed again, whole
            if group.is_main:
                _write_atomically(path, "".join(json.dumps(record) + "\n" for record in done))
        with tqdm(total=len(items), initial=len(done), desc=description, unit="prompt",
                  disable=not (self.cfg.progress and group.is_main) or len(done) == len(items)) as bar:
            for start in range(len(done), len(items), batch):
                chunk = items[start:start + batch]
                share = group.shard(chunk)
                records = group.gather_shards(work(share, start) if share else [], len(chunk))
                if group.is_main:
                    _append_jsonl(path, records)
                done.extend(records)
                bar.update(len(chunk))
                received = group.max_over_ranks(stop.received or 0, self.device)
                if received and len(done) < len(items):
                    raise TrainingInterrupted(
                        f"stopped by {signal_name(received)} ({description}): {len(done)} of "
                        f"{count_of(len(items), 'prompt')} saved in {path}; run the same command again to go on",
                        received)
        return done

    def _generate(self, policy_folder: str, prompts: List[List[int]], path: Path, tag: str, description: str,
                  stop: StopRequests) -> List[Dict]:
        """K responses per prompt (text and token ids), sampled by this process from a seed of its
        own for each batch (the run's seed, `tag`, the batch, and with several processes the process)."""
        policy = None
        process = (self.distributed.rank,) if self.distributed.enabled else ()
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id

        def work(share, start):
            nonlocal policy
            policy = policy or self._load_policy(policy_folder)
            responses = sample(policy, [prompt for _, prompt in share], self.sampling, pad_token_id=pad,
                               eos_token_id=self.tokenizer.eos_token_id, device=self.device,
                               seed=batch_seed(self.cfg.seed, tag, start, *process))
            return [{"index": index, "prompt": self.text(prompt), "prompt_ids": prompt,
                     "completions": [self.text(r) for r in own], "completion_ids": own}
                    for (index, prompt), own in zip(share, responses)]

        return self._batches(list(enumerate(prompts)), path, description, stop, work)

    def _judge(self, generated: List[Dict], path: Path, description: str, stop: StopRequests) -> List[Dict]:
        """Each prompt's scores, in a record with its generation's; an empty response scores None."""

        def work(share, start):
            kept = [[c for c in record["completions"] if c.strip()] for record in share]
            scored = self.judge.score([record["prompt"] for record in share], kept)
            records = []
            for record, scores in zip(share, scored):
                by_text = iter(scores)
                records.append({**record, "scores": [next(by_text) if c.strip() else None
                                                     for c in record["completions"]]})
            return records

        return self._batches(generated, path, description, stop, work)

    def _pairs(self, judged: List[Dict], path: Path) -> Dict[str, int]:
        """The round's pairs as prompt/chosen/rejected rows in `path`, and what was dropped."""
        rows, counts = [], {"pairs": 0, "prompts_without_pair": 0, "empty_generations": 0}
        for record in judged:
            scores = record["scores"]
            counts["empty_generations"] += sum(score is None for score in scores)
            # a response sampled twice is one response (its first sample): its pairs with itself would be ties
            first = {}
            for i, score in enumerate(scores):
                if score is not None:
                    first.setdefault(record["completions"][i], i)
            distinct = list(first.values())
            chosen_rejected = select_pairs([scores[i] for i in distinct], self.cfg.pair_selection,
                                           self.cfg.score_margin) if len(distinct) >= 2 else []
            if not chosen_rejected:
                counts["prompts_without_pair"] += 1
            for c, r in chosen_rejected:
                rows.append({"prompt": record["prompt"], "chosen": record["completions"][distinct[c]],
                             "rejected": record["completions"][distinct[r]], "score_chosen": scores[distinct[c]],
                             "score_rejected": scores[distinct[r]]})
        counts["pairs"] = len(rows)
        if self.distributed.is_main:
            _write_atomically(path, "".join(json.dumps(row) + "\n" for row in rows))
        self.distributed.barrier()
        return counts

    def _round_training(self, round_number: int, policy_folder: str, pairs_path: Path):
        cfg = self.cfg
        reference = None
        if cfg.round_reference == "initial" and policy_folder != self.initial_model:
            reference = self.initial_model
        round_cfg = dataclasses.replace(
            cfg, rounds=0, model=policy_folder, reference_model=reference, data=str(pairs_path),
            data_format="explicit", split=None, output_dir=str(self._round_dir(round_number) / "train"),
            eval_fraction=0.0, group_by_prompt=True, judge=None,
            per_device_train_batch_size=None)  # resolved into pairs_per_step above
        return train(round_cfg)

    def _round_dir(self, round_number: int) -> Path:
        return self.output_dir / f"round-{round_number}"

    def _heldout_scores(self, round_number: int, policy_folder: str, stop: StopRequests) -> List[float]:
        directory = self._round_dir(round_number)
        directory.mkdir(parents=True, exist_ok=True)
        if not self.heldout:
            return []
        generated = self._generate(policy_folder, self.heldout, directory / "heldout-generations.jsonl",
                                   "heldout", f"round {round_number}: generating for the held-out prompts", stop)
        judged = self._judge(generated, directory / "heldout.jsonl", f"round {round_number}: judging the held-out responses", stop)
        return [score for record in judged for score in record["scores"] if score is not None]

    # -- the run ----------------------------------------------------------------------------------
    def run(self) -> RoundsResult:
        cfg = self.cfg
        with StopRequests() as stop:
            records = []
            for round_number in range(cfg.rounds + 1):
                record_path = self._round_dir(round_number) / ROUND_FILE
                if record_path.is_file():
                    records.append(json.loads(record_path.read_text()))
                    continue
                self._say(f"\n== round {round_number} of {cfg.rounds} ==" if round_number else
                          "\n== round 0: the starting model's held-out score ==")
                record = self._round(round_number, stop)
                records.append(record)
                if self.distributed.is_main:
                    _write_atomically(record_path, json.dumps(record, indent=1))
                    self._write_metrics(records)
                self.distributed.barrier()
                self._say(self._round_line(record))
                received = self.distributed.max_over_ranks(stop.received or 0, self.device)
                if received and round_number < cfg.rounds:
                    raise TrainingInterrupted(
                        f"stopped by {signal_name(received)} after round {round_number} of {cfg.rounds}: it is "
                        f"saved in {self._round_dir(round_number)}; run the same command again to go on", received)
        plot_path = self._write_metrics(records) if self.distributed.is_main else None
        return RoundsResult(self.output_dir, records, self.output_dir / "metrics.jsonl", plot_path,
                            Path(self._policy_after(cfg.rounds)))

    def _policy_after(self, round_number: int) -> str:
        return self.initial_model if round_number == 0 else str(self._round_dir(round_number) / "train" / FINAL_DIR)

    def _round(self, round_number: int, stop: StopRequests) -> Dict:
        record: Dict = {"round": round_number, "split": "round"}
        directory = self._round_dir(round_number)
        directory.mkdir(parents=True, exist_ok=True)
        if round_number:
            policy = self._policy_after(round_number - 1)
            prompts = self.round_prompts(round_number)
            tick = time.perf_counter()
            generated = self._generate(policy, prompts, directory / "generations.jsonl", f"round-{round_number}",
                                       f"round {round_number}: generating", stop)
            record["generate_s"] = time.perf_counter() - tick
            tick = time.perf_counter()
            judged = self._judge(generated, directory / "judged.jsonl", f"round {round_number}: judging", stop)
            record["judge_s"] = time.perf_counter() - tick
            scores = [score for r in judged for score in r["scores"] if score is not None]
            record["score/mean"], record["score/std"] = _score_summary(scores)
            record["prompts"] = len(prompts)
            record.update(self._pairs(judged, directory / "pairs.jsonl"))
            if not record["pairs"]:
                raise ValueError(f"round {round_number}: the judge scored every response of every prompt alike, "
                                 "so there is no pair to train on (a lower --score-margin, more "
                                 "--generations-per-prompt or a higher --temperature give some)")
            tick = time.perf_counter()
            trained = self._round_training(round_number, policy, directory / "pairs.jsonl")
            record["train_s"] = time.perf_counter() - tick
            # the round's DPO metrics: its pairs scored by the trained policy, or else its last logged step's
            last = trained.final_metrics or [r for r in read_metrics(trained.metrics_path) if r["split"] == "train"][-1]
            for key in ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"):
                record[f"train/{key}"] = last[key]
        else:
            record["prompts_too_long"] = self.prompts_too_long
        tick = time.perf_counter()
        heldout = self._heldout_scores(round_number, self._policy_after(round_number), stop)
        record["heldout_s"] = time.perf_counter() - tick
        record["heldout/score_mean"], record["heldout/score_std"] = _score_summary(heldout)
        record["heldout/responses"] = len(heldout)
        return record

    @staticmethod
    def _round_line(record: Dict) -> str:
        line = f"round {record['round']}: {heldout_summary(record)}"
        if record["round"]:
            line += (f"; its prompts' responses scored {record['score/mean']:.4g} (sd {record['score/std']:.3g}), "
                     f"{count_of(record['pairs'], 'pair')}, {record['prompts_without_pair']} prompts without one, "
                     f"{record['empty_generations']} empty responses; generate {record['generate_s']:.0f} s, "
                     f"judge {record['judge_s']:.0f} s, train {record['train_s']:.0f} s, held-out "
                     f"{record['heldout_s']:.0f} s")
        return line

    def _write_metrics(self, records: List[Dict]) -> Optional[Path]:
        _write_atomically(self.output_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))
        return plot_rounds(records, self.output_dir / "rounds.png")


def heldout_summary(record: Dict) -> str:
    """A round record's held-out score, in words."""
    if not record["heldout/responses"]:
        return "no held-out prompts (--heldout-prompts 0)"
    return (f"held-out score {record['heldout/score_mean']:.4g} (sd {record['heldout/score_std']:.3g}, "
            f"{record['heldout/responses']} responses)")


def plot_rounds(records: List[Dict], png_path: Path) -> Optional[Path]:
    """The held-out judge score per round (the mean and its standard error), and the score of each
    round's own prompts' responses (sampled from the policy before the round trained on them)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(6.4, 4.0), dpi=120)
    axes = figure.add_subplot()
    rounds = [r["round"] for r in records]
    mean = [r["heldout/score_mean"] for r in records]
    error = [r["heldout/score_std"] / math.sqrt(max(r["heldout/responses"], 1)) for r in records]
    axes.errorbar(rounds, mean, yerr=error, marker="o", capsize=3,
                  label="held-out prompts, after the round (mean, standard error)")
    trained = [r for r in records if r["round"]]
    if trained:
        axes.plot([r["round"] for r in trained], [r["score/mean"] for r in trained], marker="s", linestyle="--",
                  label="the round's own prompts, before it trained")
    axes.set_xlabel("round")
    axes.set_ylabel("judge score")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.legend(loc="lower right")  # the scores rise to the upper right
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(png_path)
    return png_path


def run_rounds(cfg: TrainConfig) -> RoundsResult:
    """Run (or resume) ``cfg.rounds`` rounds of generate, judge, pair and train."""
    return Rounds(cfg).run()
