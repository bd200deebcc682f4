"""Sharded evaluation keeps the ranks in step (core/distributed.py: Lockstep, finished): every
rank runs as many forwards as every other, in the same order, although its share of the data and
the length of its generations are its own; and what each rank computes is what it computes
alone. On 2 gloo ranks; a "forward" here is an all-reduce, as an FSDP or ZeRO-3 forward's
all-gathers are collectives (a mismatch fails on the process group's timeout, not a hang)."""

from __future__ import annotations

import datetime
import json

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from core import distributed
from core.models import generation
from core.models.generation import GenerationConfig, Stepper

V, EOS = 10, 1


def forward() -> None:
    if distributed.in_lockstep():  # alone (the reference runs), a forward is local
        tdist.all_reduce(torch.ones(1))


def lockstep_pairs(items, stop_after=None):
    pairs, steps = [], distributed.Lockstep(items)
    for item, real in steps:
        forward()
        pairs.append([item, real])
        if stop_after is not None and sum(r for _, r in pairs) >= stop_after:
            steps.stop()
    return pairs


class ScriptedStepper(Stepper):
    """Logits by script: row r (of the prompt's rows) ends (EOS) from forward `ends[r]` on, else
    token 3 + (forward + row) % 5. Counts its forwards; each is a collective."""

    def __init__(self, ends: list[int]):
        self.ends, self.forwards, self.rows, self.device = ends, 0, len(ends), torch.device("cpu")
        self.row_of = torch.arange(len(ends))

    def logits(self) -> torch.Tensor:
        out = torch.full((self.rows, V), -10.0)
        for i, row in enumerate(self.row_of.tolist()):
            token = EOS if self.forwards >= self.ends[row] else 3 + (self.forwards + i) % 5
            out[i, token] = 0.0
            out[i, (token + 1) % V] = -1.0  # a second choice for beam search
        return out

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        assert tokens.shape == (self.rows,)
        forward()
        self.forwards += 1
        return self.logits()

    def reorder(self, index: torch.Tensor) -> None:
        self.rows, self.row_of = index.shape[0], self.row_of[index]


def decode(ends: list[int], beams: int) -> tuple[list, int]:
    stepper = ScriptedStepper(ends)
    cfg = GenerationConfig(max_new_tokens=8, num_beams=beams, eos_token_id=EOS)
    search = generation.beam_search if beams > 1 else generation.sample
    return search(stepper, stepper.logits(), cfg).tolist(), stepper.forwards


def worker(rank: int, init: str, out: str) -> None:
    tdist.init_process_group("gloo", init_method=init, rank=rank, world_size=2,
                             timeout=datetime.timedelta(seconds=60))  # fmt: skip
    result = {}
    with distributed.lockstep():
        result["uneven"] = lockstep_pairs(["a", "b", "c"] if rank == 0 else ["x"])
        result["empty"] = lockstep_pairs(["a", "b"] if rank == 0 else [])
        result["stopped"] = lockstep_pairs(["a", "b", "c"] if rank == 0 else ["x", "y"],
                                           stop_after=1 if rank == 0 else None)  # fmt: skip
        result["none"] = lockstep_pairs([])
        ends = [[1, 2], [4, 5]][rank]  # rank 0's rows end early, rank 1's late
        result["sample"] = decode(ends, beams=1)
        result["beam"] = decode(ends, beams=2)
    result["sample_alone"] = decode(ends, beams=1)  # outside lockstep: no collective at all
    result["beam_alone"] = decode(ends, beams=2)
    result["plain"] = [[item, real] for item, real in distributed.Lockstep(["p", "q"])]
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(result, f)
    tdist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    root = tmp_path_factory.mktemp("lockstep")
    mp.start_processes(worker, args=(f"file://{root}/store", str(root)), nprocs=2,
                       start_method="spawn")  # fmt: skip
    return [json.loads((root / f"rank{r}.json").read_text()) for r in range(2)]


def test_a_rank_out_of_items_repeats_its_last_one_not_real(ranks):
    assert ranks[0]["uneven"] == [["a", True], ["b", True], ["c", True]]
    assert ranks[1]["uneven"] == [["x", True], ["x", False], ["x", False]]


def test_a_rank_without_items_borrows_the_first_of_the_lowest_rank_that_has_one(ranks):
    assert ranks[0]["empty"] == [["a", True], ["b", True]]
    assert ranks[1]["empty"] == [["a", False], ["a", False]]


def test_a_stopped_rank_pads_until_the_others_are_done(ranks):
    assert ranks[0]["stopped"] == [["a", True], ["a", False]]
    assert ranks[1]["stopped"] == [["x", True], ["y", True]]


def test_no_items_anywhere_means_no_step_and_no_lockstep_means_plain_iteration(ranks):
    assert ranks[0]["none"] == ranks[1]["none"] == []
    assert ranks[0]["plain"] == [["p", True], ["q", True]]


@pytest.mark.parametrize("search", ["sample", "beam"])
def test_decoding_keeps_pace_and_returns_what_each_rank_decodes_alone(ranks, search):
    (tokens0, forwards0), (tokens1, forwards1) = ranks[0][search], ranks[1][search]
    alone0, alone1 = ranks[0][f"{search}_alone"], ranks[1][f"{search}_alone"]
    assert tokens0 == alone0[0] and tokens1 == alone1[0]  # the padding forwards change nothing
    assert alone0[1] < alone1[1]  # alone, rank 0 would stop earlier ...
    assert forwards0 == forwards1 == alone1[1]  # ... in lockstep both run the longest's forwards
    if search == "sample":
        assert tokens0 == [[3, EOS, EOS], [4, 5, EOS]]  # rows end at forwards 1 and 2
