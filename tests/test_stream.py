"""ShardStream (split, exact resume, bad data) and the image-text decoder it feeds."""

from __future__ import annotations

import functools
import io
import itertools
import json
import logging
import random
import re
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, processors
from transformers import PreTrainedTokenizerFast

from core.data.errors import BadSample, DataError
from core.data.preprocess import SIGLIP_MEAN, SIGLIP_STD, ImageTextDecoder, collate, with_attributes
from core.data.shards import write_sizes, write_tar
from core.data.stream import ShardStream
from core.data.synthetic import make_sample


def write_id_shards(directory: Path, sizes: list[int], blank: set[int] = frozenset()) -> str:
    """Shards whose samples carry their global index as text (empty for indices in `blank`);
    returns a brace pattern over them."""
    directory.mkdir(exist_ok=True)
    index = 0
    for shard, size in enumerate(sizes):
        samples = []
        for _ in range(size):
            text = b"" if index in blank else str(index).encode()
            samples.append((f"{index:09d}", {"txt": text}))
            index += 1
        write_tar(directory / f"ids-{shard:04d}.tar", samples)
    return str(directory / f"ids-{{0000..{len(sizes) - 1:04d}}}.tar")


def decode_id(sample: dict) -> dict:
    """The index, plus random 'augmentation' noise: resume must reproduce it too."""
    if not sample["txt"].strip():
        raise BadSample("empty_text")
    return {"id": torch.tensor(int(sample["txt"])), "noise": torch.rand(3)}


def collate_ids(samples: list[dict]) -> dict:
    return {name: torch.stack([s[name] for s in samples]) for name in samples[0]}


def id_stream(urls: str, **kwargs) -> ShardStream:
    kwargs = {"decode": decode_id, "collate": collate_ids, "batch_size": 4, **kwargs}
    return ShardStream(urls, **kwargs)


def delivered_ids(urls: str, world_size: int, **kwargs) -> list[int]:
    ids = []
    for rank in range(world_size):
        stream = id_stream(urls, rank=rank, world_size=world_size, **kwargs)
        ids += [i for batch in stream for i in batch["id"].tolist()]
    return ids


# ------------------------------------------------------------------------- split
@pytest.mark.parametrize(
    ("sizes", "world_size", "num_workers", "fallback"),
    [
        ([7, 5, 9, 6, 8], 2, 2, False),  # 5 shards over 4 slots: uneven shard split
        ([6, 4, 5, 7, 3, 5, 2, 8], 2, 0, False),
        ([13, 11, 12], 2, 2, True),  # 3 shards < 4 slots: every 4th sample
        ([9], 1, 2, True),
    ],
)
@pytest.mark.parametrize("shuffle", [False, True])
def test_one_epoch_yields_every_sample_exactly_once(
    tmp_path, caplog, sizes, world_size, num_workers, fallback, shuffle
):
    urls = write_id_shards(tmp_path, sizes)
    caplog.set_level(logging.INFO, logger="core.data.stream")
    ids = delivered_ids(
        urls, world_size, num_workers=num_workers, epochs=1, shuffle=shuffle, drop_last=False
    )
    assert sorted(ids) == list(range(sum(sizes)))
    assert ("every slot reads all shards" in caplog.text) == fallback
    if shuffle:
        assert ids != sorted(ids)


def test_two_epochs_reshuffle_and_cover_everything_twice(tmp_path):
    urls = write_id_shards(tmp_path, [10, 10, 10])
    stream = id_stream(urls, num_workers=0, epochs=2, batch_size=5)
    ids = [i for batch in stream for i in batch["id"].tolist()]
    assert sorted(ids) == sorted(list(range(30)) * 2)
    assert sorted(ids[:30]) == list(range(30)) and ids[:30] != ids[30:]
    assert stream.stats() == {"samples": 60, "bad_shards": 0, "epoch": 2}


def test_finite_stream_starts_over_once_consumed(tmp_path):
    urls = write_id_shards(tmp_path, [6, 6])
    stream = id_stream(urls, num_workers=1, epochs=1, shuffle=False, drop_last=False)
    first = [i for batch in stream for i in batch["id"].tolist()]
    second = [i for batch in stream for i in batch["id"].tolist()]
    assert first == second == list(range(12))


def test_num_samples_comes_from_sizes_json(tmp_path):
    urls = write_id_shards(tmp_path, [3, 4])
    assert id_stream(urls).num_samples() is None
    write_sizes(tmp_path, {"ids-0000.tar": 3, "ids-0001.tar": 4})
    assert id_stream(urls).num_samples() == 7
    assert id_stream(str(tmp_path / "ids-0001.tar")).num_samples() == 4
    assert id_stream("pipe:cat " + str(tmp_path / "ids-0001.tar")).num_samples() is None


def test_pipe_urls_are_streamed(tmp_path):
    write_id_shards(tmp_path, [5, 6])
    urls = [f"pipe:cat {tmp_path}/ids-000{i}.tar" for i in range(2)]
    assert sorted(delivered_ids(urls, 1, num_workers=0, epochs=1, drop_last=False)) == list(
        range(11)
    )


# ------------------------------------------------------------------------- exact resume
def assert_same_batches(expected: list[dict], actual: list[dict]) -> None:
    assert len(expected) == len(actual)
    for a, b in zip(expected, actual):
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("num_workers", [0, 1, 2])
@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("interleave", [1, 3])
def test_resume_continues_bit_for_bit(tmp_path, num_workers, world_size, interleave):
    urls = write_id_shards(tmp_path, [9, 7, 11, 8, 10], blank={3, 20, 33})
    last = tmp_path / "ids-0004.tar"  # truncated after 6 of its samples: counted once per pass
    last.write_bytes(last.read_bytes()[: 6 * 1024 + 700])
    steps = 24
    for rank in range(world_size):
        make = functools.partial(
            id_stream, urls, rank=rank, world_size=world_size, num_workers=num_workers, seed=3,
            max_bad_fraction=0.5, interleave=interleave,
        )  # fmt: skip
        stream = make()
        reference, states = [], []
        for batch in itertools.islice(stream, steps):
            reference.append(batch)
            states.append(stream.state_dict())
        epochs = [min(s["epoch"] for s in state["slots"][str(rank)]) for state in states]
        assert epochs[-1] >= 1, "the test must cross an epoch boundary"
        boundary = next(i for i, epoch in enumerate(epochs) if epoch >= 1)  # a pass completed
        for done in sorted({1, 5, boundary, boundary + 1, boundary + 2} & set(range(1, steps))):
            resumed = make()
            resumed.load_state_dict(states[done - 1])
            assert_same_batches(reference[done:], list(itertools.islice(resumed, steps - done)))
            assert resumed.state_dict() == states[-1]  # positions and bad-data counts
        counts = {k: v for k, v in stream.stats().items() if k != "epoch"}
        assert counts["skipped/empty_text"] > 0 and counts["bad_shards"] > 0


@pytest.mark.parametrize("shuffle", [False, True])
def test_interleaved_shards_mix_every_batch(tmp_path, shuffle):
    """Four shards standing for four subsets (ids 0-15, 16-31, ...): read together, every batch
    mixes them, and an epoch still delivers every sample once."""
    urls = write_id_shards(tmp_path, [16, 16, 16, 16])
    stream = id_stream(urls, batch_size=8, num_workers=0, interleave=4, epochs=1, shuffle=shuffle)
    batches = [batch["id"].tolist() for batch in stream]
    assert sorted(i for ids in batches for i in ids) == list(range(64))
    if shuffle:
        assert all(len({i // 16 for i in ids}) >= 2 for ids in batches), batches
    plain = id_stream(urls, batch_size=8, num_workers=0, epochs=1, shuffle=shuffle)
    assert all(len({i // 16 for i in b["id"].tolist()}) == 1 for b in plain)  # one shard each


def test_state_counts_delivered_batches_not_prefetched_ones(tmp_path):
    urls = write_id_shards(tmp_path, [8, 8, 8, 8])
    stream = id_stream(urls, num_workers=2, shuffle=False)
    batches = iter(stream)
    first = next(batches)
    state = stream.state_dict()
    assert state["batches"] == 1 and state["next_slot"] == 1
    assert state["logical"] == {"world_size": 1, "batch_size": 4}
    assert state["slots"]["0"][0] == {
        "epoch": 0,
        "shard": 0,
        "sample": 4,
        "counts": {"seen": 4, "samples": 4},
    }
    assert state["slots"]["0"][1]["counts"]["samples"] == 0  # its prefetched batch is not delivered
    assert first["id"].tolist() == [0, 1, 2, 3]  # slot 0 reads shards 0 and 2, slot 1 1 and 3
    assert next(batches)["id"].tolist() == [8, 9, 10, 11]


def test_state_must_fit_the_stream(tmp_path):
    urls = write_id_shards(tmp_path, [8, 8])
    state = id_stream(urls, num_workers=2).state_dict()
    with pytest.raises(ValueError, match="num_workers"):
        id_stream(urls, num_workers=1).load_state_dict(state)


def test_in_process_reading_leaves_the_callers_rng_alone(tmp_path):
    urls = write_id_shards(tmp_path, [8, 8])
    torch.manual_seed(0)
    random.seed(0)
    expected_tensor, expected_float = torch.rand(2), random.random()
    torch.manual_seed(0)
    random.seed(0)
    noise = [batch["noise"] for batch in itertools.islice(id_stream(urls, num_workers=0), 5)]
    assert torch.equal(torch.rand(2), expected_tensor) and random.random() == expected_float
    assert not torch.equal(noise[0], noise[1])  # the stream's own RNG did advance


# ------------------------------------------------------------------------- another number of ranks
GLOBAL_BATCH = 12


def resharding_data(directory: Path) -> str:
    """6 shards of uneven size, every 7th sample blank (skipped), the last shard truncated."""
    sizes = [19, 17, 23, 18, 21, 16]
    urls = write_id_shards(directory, sizes, blank=set(range(3, sum(sizes), 7)))
    last = directory / "ids-0005.tar"
    last.write_bytes(last.read_bytes()[: 9 * 1024 + 300])
    return urls


def layout(urls: str, world_size: int, num_workers: int, **kwargs) -> list[ShardStream]:
    batch_size = GLOBAL_BATCH // world_size
    return [
        id_stream(urls, rank=rank, world_size=world_size, batch_size=batch_size,
                  num_workers=num_workers, seed=5, max_bad_fraction=0.5, **kwargs)
        for rank in range(world_size)
    ]  # fmt: skip


def run(streams: list[ShardStream], steps: int) -> tuple[list[dict], list[list[dict]]]:
    """`steps` global batches (the ranks' batches concatenated) and every rank's state after
    each of them."""
    per_rank, states = [], []
    for stream in streams:
        batches = []
        states.append([])
        for batch in itertools.islice(stream, steps):
            batches.append(batch)
            states[-1].append(stream.state_dict())
        per_rank.append(batches)
    merged = [
        {name: torch.cat([b[name] for b in step]) for name in step[0]} for step in zip(*per_rank)
    ]
    return merged, states


class Recording(list):
    """A sequence of saved states that remembers which ranks were read."""

    def __init__(self, states):
        super().__init__(states)
        self.read = set()

    def __getitem__(self, index):
        self.read.add(index)
        return super().__getitem__(index)


def totals(streams: list[ShardStream]) -> Counter:
    counts = Counter()
    for stream in streams:
        counts.update({k: v for k, v in stream.stats().items() if k != "epoch"})
    return counts


def holders(rank: int, world_size: int, logical_world: int, saved_world: int) -> set[int]:
    """The saved ranks a new rank must read: rank 0 (the layout), and for every logical rank
    overlapping the new rank's part of the global batch, the saved rank its batch started on."""
    batch, logical, saved = (GLOBAL_BATCH // n for n in (world_size, logical_world, saved_world))
    overlapping = range(rank * batch // logical, ((rank + 1) * batch - 1) // logical + 1)
    return {0} | {index * logical // saved for index in overlapping}


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("worlds", [(2, 1, 2), (1, 2, 1), (4, 3, 1, 2)])
def test_another_number_of_ranks_continues_the_global_batches(tmp_path, num_workers, worlds):
    """A run started on worlds[0] ranks, resumed on worlds[1] (the global batch kept), then on
    worlds[2] ...: every rank gets its slice of the very global batches the uninterrupted run
    delivers (ids and seeded augmentation noise), bad samples included, across epochs."""
    urls = resharding_data(tmp_path)
    steps, resumes = 14, [3, 7, 10][: len(worlds) - 1]  # global batches done at each resume
    uninterrupted = layout(urls, worlds[0], num_workers)
    reference, states = run(uninterrupted, steps)
    assert min(s["epoch"] for s in states[0][-1]["slots"]["0"]) >= 1, "cross an epoch"
    assert sum(uninterrupted[0].stats()[k] for k in ("skipped/empty_text", "bad_shards")) > 0
    started = 0  # global batches done when the streams `states` come from started
    for world, start, end in zip(worlds[1:], resumes, [*resumes[1:], steps]):
        saved = [rank_states[start - started - 1] for rank_states in states]
        streams = layout(urls, world, num_workers)
        for rank, stream in enumerate(streams):
            recording = Recording(saved)
            stream.load_state_dict(recording)
            assert recording.read == holders(rank, world, worlds[0], len(saved))
        batches, states = run(streams, end - start)
        assert_same_batches(reference[start:end], batches)
        started = start
    assert totals(streams) == totals(uninterrupted)  # counts add up over the ranks
    if worlds[-1] == worlds[0]:  # back on the first layout: the very same states
        assert [s[-1] for s in states] == [stream.state_dict() for stream in uninterrupted]


@pytest.mark.parametrize(("old", "new", "reads"), [(2, 1, 1), (4, 2, 1), (1, 2, 2), (2, 3, 2)])
def test_samples_decoded_after_a_change_of_ranks(tmp_path, old, new, reads):
    """Fewer ranks: every sample is decoded once, by the one rank reading its logical rank.
    More ranks: every rank sharing a logical rank's batch decodes all of it (to agree on
    which samples are bad) and keeps its share: `reads` times each sample overall."""
    urls = resharding_data(tmp_path)
    decoded = []

    def counting(sample: dict) -> dict:
        decoded.append(sample["__key__"])
        return decode_id(sample)

    _, states = run(layout(urls, old, 0, decode=counting), 6)

    def seen(step: int) -> int:
        return sum(
            slot["counts"]["seen"]
            for rank_states in states
            for slots in rank_states[step - 1]["slots"].values()
            for slot in slots
        )

    decoded.clear()
    streams = layout(urls, new, 0, decode=counting)
    for stream in streams:
        stream.load_state_dict([rank_states[1] for rank_states in states])
    run(streams, 4)
    assert len(decoded) == reads * (seen(6) - seen(2))


def test_a_resumed_layout_saves_what_a_later_resume_needs(tmp_path):
    """The state of a rank emulating other logical ranks records them, loads back on the same
    layout exactly, and an old (version 1) state still loads, exactly too."""
    urls = resharding_data(tmp_path)
    _, states = run(layout(urls, 2, 2), 3)
    (one,) = layout(urls, 1, 2)
    one.load_state_dict([rank_states[-1] for rank_states in states])
    state = one.state_dict()
    assert state["version"] == 2 and (state["world_size"], state["batch_size"]) == (1, 12)
    assert state["logical"] == {"world_size": 2, "batch_size": 6}
    assert sorted(state["slots"]) == ["0", "1"] and state["next_slot"] == 1
    expected = list(itertools.islice(one, 5))
    (again,) = layout(urls, 1, 2)
    again.load_state_dict(json.loads(json.dumps(state)))  # through JSON
    assert_same_batches(expected, list(itertools.islice(again, 5)))

    # Version 1 (one rank's slots, no logical layout, no shard names): exact on the same
    # layout and on another number of ranks alike.
    v1 = [as_version_1(rank_states[-1]) for rank_states in states]
    ref, _ = run(layout(urls, 2, 2), 4)
    for rank, stream in enumerate(layout(urls, 2, 2)):
        stream.load_state_dict(v1[rank])
        assert_same_batches(
            [{k: v[6 * rank : 6 * rank + 6] for k, v in b.items()} for b in ref[3:]],
            list(itertools.islice(stream, 1)),
        )
    (from_v1,) = layout(urls, 1, 2)
    from_v1.load_state_dict(v1)
    assert_same_batches(expected, list(itertools.islice(from_v1, 5)))


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"num_workers": 1}, r"num_workers changed \(2 -> 1\)"),
        ({"batch_size": 8}, r"global micro-batch changed \(2 x 6 -> 1 x 8\)"),
        ({"seed": 6}, r"seed changed"),
        ({"urls": "renamed"}, r"shard list changed \(other shard names\)"),
        ({"urls": "fewer"}, r"shard list changed \(6 -> 5 shards\)"),
    ],
)
def test_other_changes_restart_at_the_next_epoch_and_say_why(tmp_path, caplog, change, reason):
    urls = resharding_data(tmp_path)
    _, states = run(layout(urls, 2, 2), 12)
    saved = [rank_states[-1] for rank_states in states]
    furthest = max(
        s["epoch"] for state in saved for slots in state["slots"].values() for s in slots
    )
    kwargs = {"rank": 0, "world_size": 1, "batch_size": 12, "num_workers": 2, "seed": 5,
              "max_bad_fraction": 0.5, **change}  # fmt: skip
    if change.get("urls") == "renamed":
        for path in sorted(tmp_path.glob("ids-*.tar")):
            path.rename(path.with_name("x" + path.name))
        kwargs["urls"] = str(tmp_path / "xids-{0000..0005}.tar")
    elif change.get("urls") == "fewer":
        kwargs["urls"] = str(tmp_path / "ids-{0000..0004}.tar")
    stream = id_stream(kwargs.pop("urls", urls), **kwargs)
    caplog.set_level(logging.WARNING, logger="core.data.stream")
    stream.load_state_dict(saved)
    assert re.search(reason + r".*the data continues at epoch " + str(furthest + 1), caplog.text)
    state = stream.state_dict()
    assert state["logical"] == {"world_size": 1, "batch_size": kwargs["batch_size"]}
    assert state["batches"] == 0 and len(state["slots"]["0"]) == max(kwargs["num_workers"], 1)
    assert all(
        s == {"epoch": furthest + 1, "shard": 0, "sample": 0, "counts": {"seen": 0, "samples": 0}}
        for s in state["slots"]["0"]
    )
    assert next(iter(stream))["id"].numel() == kwargs["batch_size"]


def test_inconsistent_saved_states_are_not_continued(tmp_path, caplog):
    """Saved states of different steps fall back to the next epoch; a state missing a logical
    rank it should hold is refused; renamed shards on the same layout only warn."""
    urls = resharding_data(tmp_path)
    _, states = run(layout(urls, 2, 2), 4)
    caplog.set_level(logging.WARNING, logger="core.data.stream")
    (one,) = layout(urls, 1, 2)
    one.load_state_dict([states[0][-1], states[1][-2]])  # rank 1's from one step earlier
    assert "the saved ranks' states disagree; the data continues at epoch 1" in caplog.text
    one.load_state_dict([states[0][-1], states[1][-1]])
    state = one.state_dict()
    with pytest.raises(ValueError, match=r"holds logical ranks \[0\], not \[0, 1\]"):
        layout(urls, 1, 2)[0].load_state_dict({**state, "slots": {"0": state["slots"]["0"]}})
    for path in sorted(tmp_path.glob("ids-*.tar")):
        path.rename(path.with_name("x" + path.name))
    renamed = id_stream(str(tmp_path / "xids-{0000..0005}.tar"), rank=0, world_size=2,
                        batch_size=6, num_workers=2, seed=5, max_bad_fraction=0.5)  # fmt: skip
    renamed.load_state_dict(states[0][-1])
    assert "shard names changed since the data state was saved" in caplog.text
    assert renamed.state_dict()["slots"] == states[0][-1]["slots"]


def test_unknown_state_versions_are_refused(tmp_path):
    urls = resharding_data(tmp_path)
    (stream,) = layout(urls, 1, 0)
    state = {**stream.state_dict(), "version": 3}
    for bad in (state, [state, state]):
        with pytest.raises(ValueError, match="unknown data state version 3"):
            stream.load_state_dict(bad)


def as_version_1(state: dict) -> dict:
    (slots,) = state["slots"].values()
    old = {k: v for k, v in state.items() if k not in ("logical", "shards")}
    return {**old, "version": 1, "slots": slots}


# ------------------------------------------------------------------------- bad data
def jpeg(size: tuple[int, int], colour=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


GOOD = 6
BAD_SAMPLES = {
    "bad_image": [{"jpg": b"this is not a jpeg", "txt": b"a caption"}],
    "truncated_jpeg": [{"jpg": jpeg((40, 40))[:300], "txt": b"a caption"}],
    "empty_text": [{"jpg": jpeg((32, 32)), "txt": b"   "}],
    "missing_text": [{"jpg": jpeg((32, 32))}],
    "missing_image": [{"txt": b"a caption"}],
    "too_large": [{"jpg": jpeg((200, 100)), "txt": b"a caption"}],
    "long_text": [{"jpg": jpeg((32, 32)), "txt": b"word " * 100}],
    "bad_text": [{"jpg": jpeg((32, 32)), "txt": b"\xff\xfe broken utf-8"}],
}
EXPECTED_SKIPS = {
    "skipped/bad_image": 2,  # the non-image and the truncated JPEG
    "skipped/bad_text": 1,
    "skipped/empty_text": 1,
    "skipped/long_text": 1,
    "skipped/missing_image": 1,
    "skipped/missing_text": 1,
    "skipped/too_large": 1,
    "skipped/truncated": 1,  # the member cut by the truncated shard
}


def write_bad_data(directory: Path) -> list[str]:
    """A shard mixing good and bad samples, a truncated shard and a non-tar 'shard'."""
    directory.mkdir()
    samples = [(f"good{i}", {"jpg": jpeg((48, 32)), "txt": b"a red square"}) for i in range(GOOD)]
    samples += [(name, fields) for name, (fields,) in BAD_SAMPLES.items()]
    write_tar(directory / "mixed.tar", samples)
    long_jpeg = jpeg((64, 64), colour=(10, 200, 10)) + bytes(4000)  # JPEG ignores the padding
    write_tar(
        directory / "cut.tar", [(f"cut{i}", {"jpg": long_jpeg, "txt": b"x"}) for i in range(3)]
    )
    with tarfile.open(directory / "cut.tar") as tar:
        cut = tar.getmember("cut1.jpg").offset_data + 100  # keeps cut0, cuts cut1, loses cut2
    (directory / "cut.tar").write_bytes((directory / "cut.tar").read_bytes()[:cut])
    (directory / "junk.tar").write_bytes(b"\x00garbage" * 300)
    return [str(directory / name) for name in ("mixed.tar", "cut.tar", "junk.tar")]


def shapes_decoder(tokenizer, **kwargs) -> ImageTextDecoder:
    limits = {"max_pixels": 100 * 100, "max_caption_bytes": 200, **kwargs}
    return ImageTextDecoder(32, SIGLIP_MEAN, SIGLIP_STD, tokenizer, max_text_len=16, **limits)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_samples_and_shards_are_skipped_and_counted(
    tmp_path, caplog, shapes_tokenizer, num_workers
):
    urls = write_bad_data(tmp_path / "bad")
    stream = ShardStream(
        urls,
        decode=shapes_decoder(shapes_tokenizer),
        collate=collate,
        batch_size=3,
        num_workers=num_workers,
        epochs=1,
        drop_last=False,
        max_bad_fraction=1.0,
    )
    keys = [key for batch in stream for key in batch["key"]]
    assert sorted(keys) == sorted([f"good{i}" for i in range(GOOD)] + ["cut0"])
    assert stream.stats() == {"samples": GOOD + 1, **EXPECTED_SKIPS, "bad_shards": 2, "epoch": 1}
    if num_workers == 0:  # worker processes log to their own stderr
        assert f"shard {urls[1]} is truncated" in caplog.text
        assert f"skipping unreadable shard {urls[2]}" in caplog.text


def test_too_many_bad_samples_stop_the_run_naming_shard_and_reason(tmp_path):
    samples = [(f"{i:09d}", {"txt": b"" if i % 5 == 0 else str(i).encode()}) for i in range(150)]
    write_tar(tmp_path / "noisy.tar", samples)
    urls = str(tmp_path / "noisy.tar")
    for num_workers in (0, 1):
        stream = id_stream(urls, num_workers=num_workers, max_bad_fraction=0.1)
        with pytest.raises(DataError, match=r"noisy\.tar; most common reason: empty_text"):
            for _ in stream:
                pass
    tolerant = id_stream(urls, num_workers=0, max_bad_fraction=0.25, epochs=1, shuffle=False)
    assert sum(len(batch["id"]) for batch in tolerant) == 120
    assert tolerant.stats()["skipped/empty_text"] == 30


def test_a_few_early_bad_samples_do_not_stop_the_run(tmp_path):
    samples = [(f"{i:09d}", {"txt": b"" if i < 5 else str(i).encode()}) for i in range(60)]
    write_tar(tmp_path / "early.tar", samples)
    stream = id_stream(str(tmp_path / "early.tar"), num_workers=0, shuffle=False, epochs=1)
    assert sum(len(batch["id"]) for batch in stream) == 52  # 55 good, last partial batch dropped
    assert stream.stats()["skipped/empty_text"] == 5


def test_an_epoch_of_only_broken_shards_for_one_slot_is_not_fatal(tmp_path, caplog):
    urls = write_id_shards(tmp_path, [12, 12, 12])
    (tmp_path / "ids-0002.tar").write_bytes(b"garbage" * 200)
    bad_shards = 0
    for rank in range(3):  # one shard per rank and epoch, reshuffled every epoch
        stream = id_stream(urls, rank=rank, world_size=3, num_workers=0)
        assert len(list(itertools.islice(stream, 12))) == 12
        bad_shards += stream.stats()["bad_shards"]
    assert bad_shards >= 3


def test_a_stream_with_no_readable_data_fails_instead_of_spinning(tmp_path):
    (tmp_path / "junk.tar").write_bytes(b"garbage" * 200)
    with pytest.raises(DataError, match="no samples"):
        next(iter(id_stream(str(tmp_path / "junk.tar"), num_workers=0)))


# ------------------------------------------------------------------------- decoder
def test_decoder_outputs(shapes_dir, shapes_tokenizer):
    jpeg_bytes, record = make_sample(0, "val", 0, image_size=48)
    text = record["caption"].encode()
    out = shapes_decoder(shapes_tokenizer)({"__key__": "k", "jpg": jpeg_bytes, "txt": text})
    assert out["key"] == "k"
    pixels = out["pixel_values"]
    assert pixels.shape == (3, 32, 32) and pixels.dtype == torch.float32
    assert pixels.min() >= -1.0 and pixels.max() <= 1.0 and pixels.std() > 0.05
    ids, mask = out["input_ids"], out["attention_mask"]
    assert ids.dtype == mask.dtype == torch.int64 and ids.shape == mask.shape == (16,)
    length = int(mask.sum())
    assert mask[:length].all() and not mask[length:].any()  # right padding
    assert ids[length - 1] == shapes_tokenizer.eos_token_id
    assert (ids[length:] == shapes_tokenizer.pad_token_id).all()
    expected = shapes_tokenizer(record["caption"])["input_ids"][: length - 1]
    assert ids[: length - 1].tolist() == expected  # truncated, then EOS


def test_decoder_resizes_the_short_side_and_centre_crops(shapes_tokenizer):
    image = Image.new("RGB", (300, 100), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 60, 100))  # red at the left edge: cropped away
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    decode = shapes_decoder(shapes_tokenizer, max_pixels=300 * 100)
    out = decode({"__key__": "k", "jpg": buffer.getvalue(), "txt": b"x"})
    pixels = out["pixel_values"]
    assert pixels.shape == (3, 32, 32)
    blue = torch.tensor([-1.0, -1.0, 1.0]).view(3, 1, 1)
    assert torch.allclose(pixels, blue.expand(3, 32, 32), atol=0.02)


def test_decoder_keeps_a_tokenizers_own_eos_and_pads_with_eos_without_pad(shapes_tokenizer):
    backend = Tokenizer.from_str(shapes_tokenizer.backend_tokenizer.to_str())
    eos = shapes_tokenizer.eos_token_id
    backend.post_processor = processors.TemplateProcessing(
        single="$A <eos>", special_tokens=[("<eos>", eos)]
    )
    adds_eos = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")
    assert adds_eos.pad_token_id is None
    decoder = shapes_decoder(adds_eos)
    ids, mask = decoder.tokenize("a large red circle")
    length = int(mask.sum())
    assert ids[:length].tolist() == adds_eos("a large red circle")["input_ids"]
    assert (ids[length:] == eos).all()
    ids, mask = decoder.tokenize("word " * 50)  # truncated: still ends in one EOS
    assert mask.all() and ids[-1] == eos and ids[-2] != eos


def test_collate_and_attributes(shapes_tokenizer):
    jpeg_bytes, record = make_sample(0, "val", 1, image_size=32)
    decode = with_attributes(shapes_decoder(shapes_tokenizer))
    raw = {"jpg": jpeg_bytes, "txt": record["caption"].encode()}
    with_json = decode({"__key__": "a", **raw, "json": b'{"background": "gray"}'})
    without = decode({"__key__": "b", **raw})
    batch = collate([with_json, without])
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (2, 16)
    assert batch["key"] == ["a", "b"]
    assert batch["attributes"] == [{"background": "gray"}, None]
