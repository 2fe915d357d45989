"""Two processes (gloo, CPU) train exactly like one process with the same global batch."""
import json
import os
import socket
import sys

import pytest
import torch
import torch.multiprocessing as mp

from fastpref.train.loop import TrainConfig, train
from test_trainer import config

pytestmark = pytest.mark.slow  # processes of their own, each importing torch and training


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank, world_size, port, options, report):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size),
                      RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    result = train(TrainConfig(**options))
    if rank == 0:
        with open(report, "w") as handle:
            json.dump({"losses": result.losses}, handle)
    dist.barrier()
    exit_without_teardown()


def exit_without_teardown():
    """End a finished worker at once. Tearing down a gloo process group while DDP's reducer is
    being freed can deadlock (the group's thread waits for the GIL the destructor holds), which
    would hang the test instead of failing it; the work is done, so skip the teardown."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.mark.parametrize("options", [dict(prefix_sharing=False), dict(prefix_sharing=True), dict(loss_type="kto")],
                         ids=["packed", "prefix-shared", "kto"])
def test_two_processes_equal_one_process(tmp_path, small_data, options):
    """(kto: each micro-batch's 3 examples split 2 + 1, so KTO's KL reference point must be the mean
    over the batch's examples, whatever the split.)"""
    options = dict(options, pairs_per_step=3, gradient_accumulation_steps=2, max_steps=3, save_steps=2)
    single = train(config(tmp_path / "one", small_data, **options))

    two = config(tmp_path / "two", small_data, **options)
    report = tmp_path / "two.json"
    mp.spawn(_worker, args=(2, _free_port(), vars(two), str(report)), nprocs=2, join=True)
    losses = json.loads(report.read_text())["losses"]
    assert losses == pytest.approx(single.losses, rel=1e-5, abs=1e-6)

    from transformers import AutoModelForCausalLM

    weights = [AutoModelForCausalLM.from_pretrained(tmp_path / run / "run" / "final", local_files_only=True)
               for run in ("one", "two")]
    # Adam divides by the gradient's running size, so a near-zero gradient (a rare token's
    # embedding row) turns last-bit differences of the all-reduce into visible ones: compare norms.
    for (name, a), (_, b) in zip(weights[0].named_parameters(), weights[1].named_parameters()):
        assert (a - b).norm() <= 1e-4 * a.norm(), name
    checkpoints = sorted(p.name for p in (tmp_path / "two" / "run").glob("checkpoint-*"))
    assert checkpoints == ["checkpoint-2"], "checkpoints are written once, by rank 0"


def _runs_worker(rank, world_size, port, plan, report):
    """Each run of `plan`: (name, TrainConfig fields, None or (step, ranks): the step after which
    SIGTERM reaches those ranks, then the same run again, which resumes). Rank 0 writes every run's
    losses (a stopped run's: those of its resumption) and the stop messages."""
    import signal

    import torch.distributed as dist

    from fastpref.train.loop import TrainingInterrupted

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size),
                      RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    losses, messages = {}, {}
    for name, options, stop in plan:
        if stop is not None:
            step, ranks = stop

            def send(current, step=step, ranks=ranks):
                if current == step and rank in ranks:
                    os.kill(os.getpid(), signal.SIGTERM)

            try:
                train(TrainConfig(**options), on_step=send)
                messages[name] = "not stopped"
            except TrainingInterrupted as stopped:
                messages[name] = f"{stopped.exit_code}: {stopped}"
        losses[name] = train(TrainConfig(**options)).losses
    if rank == 0:
        with open(report, "w") as handle:
            json.dump({"losses": losses, "messages": messages}, handle)
    dist.barrier()
    exit_without_teardown()


def test_three_processes_through_a_last_step_of_one_pair_and_a_sigterm(tmp_path, small_data):
    """19 training pairs in micro-batches of 3: the epoch's last step has 1 pair, so two of the three
    processes have none (they run a placeholder with weight 0, and reduce the same metric keys).
    DDP and FSDP2 train like one process through it. SIGTERM after step 3 (under DDP reaching one
    process, under FSDP2 all of them) stops every process with a checkpoint, and the rerun
    resumes to the uninterrupted run's losses and weights."""
    from transformers import AutoModelForCausalLM

    options = dict(pairs_per_step=3, max_steps=7, eval_steps=7, save_steps=100)
    single = train(config(tmp_path / "one", small_data, **options))
    assert len(single.losses) == 7
    plan = []
    for parallel, stopped_ranks in (("ddp", [2]), ("fsdp", [0, 1, 2])):
        for stop in (None, (3, stopped_ranks)):
            name = parallel + ("-sigterm" if stop else "")
            plan.append((name, vars(config(tmp_path / name, small_data, parallel=parallel, **options)), stop))
    report = tmp_path / "three.json"
    mp.spawn(_runs_worker, args=(3, _free_port(), plan, str(report)), nprocs=3, join=True)
    outcome = json.loads(report.read_text())
    for parallel in ("ddp", "fsdp"):
        assert outcome["losses"][parallel] == pytest.approx(single.losses, rel=1e-5, abs=1e-6), parallel
        message = outcome["messages"][f"{parallel}-sigterm"]
        assert message.startswith("143: stopped by SIGTERM at step 3 of 7: checkpoint saved to"), message
        resumed = outcome["losses"][f"{parallel}-sigterm"]
        assert resumed == pytest.approx(single.losses[3:], rel=1e-5, abs=1e-6), parallel
        run = tmp_path / f"{parallel}-sigterm" / "run"
        assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-3"]
        weights = [AutoModelForCausalLM.from_pretrained(path / "final", local_files_only=True)
                   for path in (tmp_path / "one" / "run", run)]
        for (name, a), (_, b) in zip(weights[0].named_parameters(), weights[1].named_parameters()):
            assert (a - b).norm() <= 1e-4 * a.norm(), name
