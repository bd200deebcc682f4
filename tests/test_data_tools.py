"""Data tools: `vlscale shards index` (sizes.json from img2dataset `*_stats.json` or a pixparse
`_info.json`, no tar read), `shards cc3m` counting from `_info.json`, and the image-caption
decoder's `image_keys` / `text_keys` (`data.image_keys`, `data.text_keys` of the siglip kind)."""

from __future__ import annotations

import argparse
import fnmatch
import io
import json
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

from core.config import ConfigError
from core.data import shards
from core.data.errors import BadSample
from core.data.preprocess import SIGLIP_MEAN, SIGLIP_STD, ImageTextDecoder, collate
from core.data.shards import read_sizes, write_tar
from core.data.stream import ShardStream
from launch import shards as shards_cli


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    shards_cli.add_arguments(parser)
    return shards_cli.main(parser.parse_args(list(argv)))


def image(image_format: str, colour=(200, 30, 30), size=(24, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format=image_format)
    return buffer.getvalue()


@pytest.fixture
def no_tar_reads(monkeypatch):
    """Fail the test if any tar is opened to be counted."""

    def refuse(path):
        raise AssertionError(f"{path} was read")

    monkeypatch.setattr(shards, "index_tar", refuse)


# ------------------------------------------------------------------ img2dataset layout
def img2dataset_output(directory: Path) -> dict[str, int]:
    """What `img2dataset --output_format webdataset` leaves (img2dataset/downloader.py, writer.py,
    logger.py): per shard NNNNN.tar (KEY.jpg|webp + KEY.txt + KEY.json, successful samples only),
    NNNNN.parquet (every sample's metadata) and NNNNN_stats.json, whose `successes` is the
    number of samples in the tar; `count` includes the failed ones."""
    directory.mkdir()
    written = {"00000.tar": ("jpg", 4, 2), "00001.tar": ("webp", 3, 1)}  # ext, ok, failed
    for shard, (name, (ext, ok, failed)) in enumerate(written.items()):
        samples = [
            (f"{shard:05d}{i:04d}", {ext: image(ext.upper().replace("JPG", "JPEG")),
                                     "txt": f"caption {i}".encode(),
                                     "json": json.dumps({"status": "success"}).encode()})
            for i in range(ok)
        ]  # fmt: skip
        write_tar(directory / name, samples)
        (directory / name.replace(".tar", ".parquet")).write_bytes(b"PAR1 metadata PAR1")
        stats = {
            "count": ok + failed,
            "successes": ok,
            "failed_to_download": failed,
            "failed_to_resize": 0,
            "duration": 1.25,
            "start_time": 1700000000.0,
            "end_time": 1700000001.25,
            "status_dict": {"success": ok, "Connection timed out": failed},
        }
        stats_file = directory / name.replace(".tar", "_stats.json")
        stats_file.write_text(json.dumps(stats, indent=4))
    return {name: ok for name, (_, ok, _) in written.items()}


def test_index_from_img2dataset_stats_reads_no_tar(tmp_path, no_tar_reads, capsys):
    expected = img2dataset_output(tmp_path / "laion")
    assert run_cli("index", str(tmp_path / "laion")) == 0
    assert read_sizes(tmp_path / "laion") == expected
    assert "7 samples in 2 shards (2 from _stats.json)" in capsys.readouterr().out


def test_indexed_img2dataset_shards_stream_with_webp_images(tmp_path, shapes_tokenizer):
    directory = tmp_path / "laion"
    img2dataset_output(directory)
    assert run_cli("index", str(directory)) == 0
    decoder = ImageTextDecoder(16, SIGLIP_MEAN, SIGLIP_STD, shapes_tokenizer, max_text_len=8)
    urls = [str(directory / "00000.tar"), str(directory / "00001.tar")]
    stream = ShardStream(
        urls, decode=decoder, collate=collate, batch_size=7, num_workers=0, epochs=1
    )
    assert stream.num_samples() == 7  # from the sizes.json written by index
    (batch,) = list(stream)
    assert batch["pixel_values"].shape == (7, 3, 16, 16)  # 4 jpg + 3 webp
    assert stream.stats()["samples"] == 7


def pixparse_output(directory: Path) -> dict[str, int]:
    """pixparse/cc3m-wds: cc3m-{split}-NNNN.tar (KEY.jpg + KEY.txt) and an _info.json with
    every split's file names and shard lengths, as timm's ReaderWds reads it."""
    directory.mkdir()
    sizes = {"cc3m-train-0000.tar": 3, "cc3m-train-0001.tar": 2, "cc3m-validation-0000.tar": 2}
    for name, count in sizes.items():
        samples = [(f"{name[:-4]}-{i:06d}", {"jpg": image("JPEG"), "txt": b"a cat"})
                   for i in range(count)]  # fmt: skip
        write_tar(directory / name, samples)
    info = {"name": "cc3m", "splits": {}}
    for split in ("train", "validation"):
        names = [name for name in sizes if f"-{split}-" in name]
        info["splits"][split] = {
            "name": split,
            "num_samples": sum(sizes[n] for n in names),
            "filenames": names,
            "shard_lengths": [sizes[n] for n in names],
        }
    (directory / "_info.json").write_text(json.dumps(info, indent=2))
    return sizes


def test_index_from_pixparse_info_json_reads_no_tar(tmp_path, no_tar_reads, capsys):
    expected = pixparse_output(tmp_path / "cc3m")
    assert run_cli("index", str(tmp_path / "cc3m"), "--pattern", "cc3m-train-*.tar") == 0
    assert read_sizes(tmp_path / "cc3m") == {k: v for k, v in expected.items() if "train" in k}
    assert run_cli("index", str(tmp_path / "cc3m")) == 0  # merged into the same sizes.json
    assert read_sizes(tmp_path / "cc3m") == expected
    assert "(3 from _info.json)" in capsys.readouterr().out


def test_index_without_any_listing_fails_or_reads(tmp_path, capsys):
    directory = tmp_path / "plain"
    expected = pixparse_output(directory)
    (directory / "_info.json").unlink()
    assert run_cli("index", str(directory)) == 2
    assert "no _info.json, info.json or *_stats.json" in capsys.readouterr().err
    assert not (directory / "sizes.json").exists()
    assert run_cli("index", str(directory), "--read") == 0
    assert read_sizes(directory) == expected
    assert "(3 from read)" in capsys.readouterr().out
    assert run_cli("index", str(directory), "--pattern", "*.tgz") == 2
    assert "no files matching '*.tgz'" in capsys.readouterr().err


def test_index_names_shards_it_cannot_count(tmp_path, capsys):
    directory = tmp_path / "laion"
    img2dataset_output(directory)
    shutil.copy(directory / "00000.tar", directory / "00002.tar")  # no stats: not listed
    whole = (directory / "00001.tar").read_bytes()
    (directory / "00001.tar").write_bytes(whole[:1000])  # cut: not a whole number of blocks
    stats = json.loads((directory / "00000_stats.json").read_text())
    (directory / "00000_stats.json").write_text(json.dumps({**stats, "successes": 400}))
    assert run_cli("index", str(directory)) == 1
    err = capsys.readouterr().err
    assert re.search(r"00000.tar: \d+ bytes cannot hold the 400 samples _stats.json lists", err)
    assert "00001.tar: 1000 bytes cannot hold the 3 samples" in err
    assert "00002.tar: no _info.json or _stats.json lists it" in err
    assert not (directory / "sizes.json").exists()
    # --read counts what the listing cannot vouch for; the cut shard stays out
    assert run_cli("index", str(directory), "--read") == 1
    assert read_sizes(directory) == {"00000.tar": 4, "00002.tar": 4}
    assert "00001.tar: truncated" in capsys.readouterr().err
    # a shard the listing cannot vouch for any more loses its old count
    (directory / "00002.tar").write_bytes((directory / "00002.tar").read_bytes()[:700])
    assert run_cli("index", str(directory), "--pattern", "0000[12].tar", "--read") == 1
    assert read_sizes(directory) == {"00000.tar": 4}
    assert "1 stale entries removed" in capsys.readouterr().out


def test_index_disagreeing_and_malformed_listings(tmp_path, capsys):
    directory = tmp_path / "both"
    pixparse_output(directory)
    (directory / "cc3m-train-0000_stats.json").write_text(json.dumps({"successes": 2}))
    assert run_cli("index", str(directory)) == 1
    assert "listed counts disagree: _info.json 3, _stats.json 2" in capsys.readouterr().err
    assert "cc3m-train-0000.tar" not in read_sizes(directory)
    (directory / "_info.json").write_text(json.dumps({"splits": {"train": {"filenames": ["a"]}}}))
    assert run_cli("index", str(directory)) == 2
    assert "_info.json: not a split info file" in capsys.readouterr().err


# ------------------------------------------------------------------ cc3m
def test_cc3m_counts_from_the_sources_info_json(tmp_path, monkeypatch):
    expected = pixparse_output(tmp_path / "pixparse")
    reads = []
    real = shards.index_tar
    monkeypatch.setattr(shards, "index_tar", lambda path: reads.append(path) or real(path))
    out = tmp_path / "cc3m"
    assert run_cli("cc3m", "--out", str(out), "--source", str(tmp_path / "pixparse")) == 0
    assert read_sizes(out) == expected and reads == []
    assert run_cli("cc3m", "--out", str(out), "--source", str(tmp_path / "pixparse")) == 0
    assert read_sizes(out) == expected and reads == []  # a second run: copies kept, nothing read
    argv = ["cc3m", "--out", str(out), "--source", str(tmp_path / "pixparse"), "--verify"]
    assert run_cli(*argv) == 0
    assert read_sizes(out) == expected and len(reads) == 3


def test_cc3m_from_the_hub_downloads_and_uses_info_json(tmp_path, monkeypatch, no_tar_reads):
    import huggingface_hub

    repo = tmp_path / "hub_repo"
    expected = pixparse_output(repo)
    (repo / "README.md").write_text("card")
    requested = []

    def fake_snapshot_download(repo_id, repo_type, allow_patterns, local_dir):
        requested.append((repo_id, repo_type, allow_patterns))
        for path in repo.iterdir():
            if any(fnmatch.fnmatch(path.name, pattern) for pattern in allow_patterns):
                shutil.copy(path, Path(local_dir) / path.name)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    out = tmp_path / "cc3m"
    assert run_cli("cc3m", "--out", str(out)) == 0
    assert requested[0][:2] == ("pixparse/cc3m-wds", "dataset")
    assert "_info.json" in requested[0][2]
    assert read_sizes(out) == expected
    assert not (out / "README.md").exists()


# ------------------------------------------------------------------ image / text keys
KEYED_SAMPLES = {
    "png_caption": {"png": image("PNG", (0, 0, 255)), "caption": b"a blue box"},
    "webp_txt": {"webp": image("WEBP", (0, 255, 0)), "txt": b"a green box"},
    "jpg_first": {"jpg": image("JPEG", (255, 0, 0)), "png": image("PNG", (0, 0, 255)),
                  "txt": b"red wins", "caption": b"not this one"},
    "upper_case": {"JPG": image("JPEG"), "TXT": b"extensions are lower-cased when read"},
    "gif_only": {"gif": image("GIF"), "txt": b"no image key matches"},
    "json_only": {"jpg": image("JPEG"), "json": b"{}"},
}  # fmt: skip


def test_first_present_image_and_text_keys_win(tmp_path, shapes_tokenizer):
    write_tar(tmp_path / "keys.tar", list(KEYED_SAMPLES.items()))
    decoder = ImageTextDecoder(8, SIGLIP_MEAN, SIGLIP_STD, shapes_tokenizer, max_text_len=16)
    assert (decoder.image_keys, decoder.text_keys) == (("jpg", "png", "webp"), ("txt", "caption"))
    stream = ShardStream(
        str(tmp_path / "keys.tar"), decode=decoder, collate=collate, batch_size=1,
        num_workers=0, epochs=1, shuffle=False, max_bad_fraction=1.0,
    )  # fmt: skip
    out = {batch["key"][0]: batch for batch in stream}
    assert sorted(out) == ["jpg_first", "png_caption", "upper_case", "webp_txt"]
    stats = stream.stats()
    assert (stats["samples"], stats["skipped/missing_image"], stats["skipped/missing_text"]) == (
        4, 1, 1
    )  # fmt: skip
    colour = {key: out[key]["pixel_values"][0].mean(dim=(1, 2)).argmax().item() for key in out}
    assert colour["png_caption"] == 2 and colour["webp_txt"] == 1 and colour["jpg_first"] == 0
    ids = out["jpg_first"]["input_ids"][0][: int(out["jpg_first"]["attention_mask"].sum())]
    assert shapes_tokenizer.decode(ids[:-1]) == "red wins"
    # other keys: the png-only decoder finds no image in the jpg and webp samples
    png_only = ImageTextDecoder(
        8, SIGLIP_MEAN, SIGLIP_STD, shapes_tokenizer, image_keys="PNG", text_keys=" caption ;"
    )
    assert png_only(dict(KEYED_SAMPLES["png_caption"], __key__="k"))["key"] == "k"
    webp_caption = {"__key__": "w", "webp": image("WEBP"), "caption": b"a box"}
    png_txt = {"__key__": "p", "png": image("PNG"), "txt": b"a box"}
    for sample, reason in ((webp_caption, "missing_image"), (png_txt, "missing_text")):
        with pytest.raises(BadSample, match=reason):
            png_only(sample)
    with pytest.raises(ValueError, match="no member key"):
        ImageTextDecoder(8, SIGLIP_MEAN, SIGLIP_STD, shapes_tokenizer, image_keys=" ; ")


def test_siglip_data_config_sets_the_keys(shapes_dir):
    from core.recipe import load_config
    from core.tasks.siglip import SigLIPTask

    tokenizer = f"model.tokenizer={shapes_dir / 'tokenizer'}"
    cfg = load_config(
        "tiny_siglip", [tokenizer, "data.image_keys=png;WEBP", "data.text_keys=caption"]
    )
    task = SigLIPTask(cfg)
    assert task.decoder.image_keys == ("png", "webp") and task.decoder.text_keys == ("caption",)
    assert load_config("tiny_siglip", [tokenizer]).data.image_keys == "jpg;png;webp"
    with pytest.raises(ConfigError, match="data.text_keys"):
        SigLIPTask(load_config("tiny_siglip", [tokenizer, "data.text_keys=;"]))
