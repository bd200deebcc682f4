"""Hub checkpoints are downloaded once per node: local rank 0 downloads while the node's other
ranks wait, then read the cache; a failed download fails every rank instead of hanging them."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from test_train import ROOT

SCRIPT = """
import json, os, sys, time
import huggingface_hub
sys.path.insert(0, {root!r})
from core.distributed import init_distributed
from core.models import hub

calls = []
def fake(repo_id, allow_patterns=None, local_files_only=False, repo_type="model"):
    calls.append((time.time(), local_files_only))
    if {fail!r} and not local_files_only:
        raise OSError("no network")
    if not local_files_only:
        time.sleep(1.0)  # a download takes a while; the others must wait for it
        os.makedirs({cache!r}, exist_ok=True)
    elif not os.path.isdir({cache!r}):
        raise FileNotFoundError("not in the cache")
    return {cache!r}
huggingface_hub.snapshot_download = fake
dist = init_distributed("gloo")
try:
    path = str(hub.resolve("owner/model"))
    error = None
except OSError as err:
    path, error = None, str(err)
open(sys.argv[1] + f"/rank{{dist.rank}}.json", "w").write(json.dumps(
    {{"calls": calls, "path": path, "error": error}}))
import torch.distributed as tdist
tdist.barrier()  # no rank tears gloo down while the other still uses it (SIGABRT at exit)
tdist.destroy_process_group()
"""


def launch(tmp_path, fail: bool) -> list[dict]:
    script = tmp_path / "resolve.py"
    cache = str(tmp_path / "cache")
    script.write_text(textwrap.dedent(SCRIPT.format(root=str(ROOT), cache=cache, fail=fail)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_port=29731", str(script), str(tmp_path)]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_local_rank_zero_downloads_and_the_others_read_the_cache(tmp_path):
    rank0, rank1 = launch(tmp_path, fail=False)
    assert [c[1] for c in rank0["calls"]] == [False]  # one real download, on local rank 0
    assert [c[1] for c in rank1["calls"]] == [True]  # the other rank: the cache only
    assert rank1["calls"][0][0] >= rank0["calls"][0][0] + 1.0  # after the download finished
    assert rank0["path"] == rank1["path"] == str(tmp_path / "cache")


def test_a_failed_download_fails_every_rank(tmp_path):
    rank0, rank1 = launch(tmp_path, fail=True)
    assert (
        rank0["error"] == rank1["error"] == ("downloading owner/model failed: OSError: no network")
    )
    assert rank1["calls"] == []  # it never tried the cache
