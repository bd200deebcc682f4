"""`vlscale push RUN_OR_EXPORT REPO_ID [--private] [--revision R] [--dry-run]`: upload an export
(`vlscale export`'s OUT: towers, tokenizers, processors, model card) to the Hugging Face Hub.

Given a run directory (config.yaml + checkpoints/) it exports the newest checkpoint (or --step)
into a temporary directory first. The upload is huggingface_hub's: `HfApi().create_repo(REPO_ID,
exist_ok=True)` (--private applies to a repo it creates; an existing repo keeps its visibility),
`create_branch` for --revision, then one `upload_folder` commit. The token is huggingface_hub's
own (`huggingface-cli login` or HF_TOKEN): vlscale never reads, prints or stores it. --dry-run
lists what would be uploaded and contacts nobody.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="a training run directory, or a `vlscale export` OUT")
    parser.add_argument("repo_id", help="the Hub model repo, e.g. user/my-vlm")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--revision", default=None, help="branch to commit to (created if new)")
    parser.add_argument("--step", type=int, default=None, help="a run's checkpoint to export")
    parser.add_argument("--dry-run", action="store_true", help="list the files; upload nothing")


def kind_of(path: Path) -> str:
    """What `path` is: a "run" (config.yaml + checkpoints/) or an "export" (config.yaml +
    model.safetensors, no checkpoints/); else ValueError."""
    if (path / "config.yaml").is_file() and (path / "checkpoints").is_dir():
        return "run"
    if (path / "config.yaml").is_file() and (path / "model.safetensors").is_file():
        return "export"
    raise ValueError(
        f"{path} is neither a run directory (config.yaml + checkpoints/) nor a `vlscale export` "
        "output (config.yaml + model.safetensors)"
    )


def upload(folder: Path, repo_id: str, *, private: bool = False, revision: str | None = None,
           api=None) -> str:  # fmt: skip
    """Create the repo (and branch) when missing and commit `folder` to it; the commit's URL.
    `api`: an HfApi (default: a new one, authenticated by huggingface_hub itself)."""
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    # private=None: a new repo gets the account's default visibility unless --private
    api.create_repo(repo_id, repo_type="model", private=private or None, exist_ok=True)
    if revision:
        api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        repo_type="model",
        revision=revision,
        commit_message="vlscale export",
    )
    return str(getattr(commit, "commit_url", None) or commit)


def files(folder: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(folder)), p.stat().st_size)
                  for p in folder.rglob("*") if p.is_file())  # fmt: skip


def push(source: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
         step: int | None = None, dry_run: bool = False, api=None) -> str:  # fmt: skip
    """Upload a run (exported first, into a temporary directory) or an export to `repo_id`.
    Returns the commit URL, or with `dry_run` a listing of the files."""
    from launch.export import export

    source = Path(source)
    with tempfile.TemporaryDirectory(prefix="vlscale-push-") as tmp:
        if kind_of(source) == "run":
            folder = export(source, Path(tmp) / "export", step)
        else:
            if step is not None:
                raise ValueError("--step selects a run's checkpoint; this is an export")
            folder = source
        if dry_run:
            listing = "\n".join(f"  {name}  ({size:,} bytes)" for name, size in files(folder))
            where = f"{repo_id}@{revision}" if revision else repo_id
            return f"would upload {folder} to {where} (private={private}):\n{listing}"
        return upload(folder, repo_id, private=private, revision=revision, api=api)


def main(args) -> int:
    try:
        result = push(args.source, args.repo_id, private=args.private, revision=args.revision,
                      step=args.step, dry_run=args.dry_run)  # fmt: skip
    except ValueError as err:
        print(f"vlscale push: error: {err}", file=sys.stderr)
        return 2
    print(result if args.dry_run else f"pushed {args.source} -> {result}")
    return 0
