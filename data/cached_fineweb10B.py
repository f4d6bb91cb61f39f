"""Download pre-tokenized FineWeb shards (GPT-2 BPE, llm.c shard format) from the Hugging Face hub.

    python data/cached_fineweb10B.py N [--variant {10B,100B,edu10B}] [--out_dir DIR]

fetches the validation shard and the first N training shards of the chosen variant into
DIR (default data/<variant dir>, e.g. data/fineweb10B). Shards already present and valid
(checked with train_gpt.read_shard) are skipped, so the script can be re-run to resume or
extend a download. Each shard is ~100M tokens (~200 MB). On any failure (no network, missing
huggingface_hub, a corrupt download) it prints one line and exits with status 2.

Without a network: copy the shard files (e.g. from another machine that ran this script) into
the output directory by hand; they are recognised as present and nothing is downloaded.
"""

import argparse
import os
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from train_gpt import DataError, read_shard  # noqa: E402  (shard format lives in train_gpt.py)

# variant -> (hub dataset repo, default local dir name, file-name prefix, number of train shards)
# Names verified against the public download scripts: the edu copy uses the "finewebedu_" prefix.
# The 100B shard count is approximate (the upstream script says ~1030); it only bounds N.
VARIANTS = {
    "10B": ("kjj0/fineweb10B-gpt2", "fineweb10B", "fineweb", 103),
    "100B": ("kjj0/fineweb100B-gpt2", "fineweb100B", "fineweb", 1030),
    "edu10B": ("kjj0/finewebedu10B-gpt2", "finewebedu10B", "finewebedu", 99),
}


def shard_names(prefix, n_train):
    """The val shard, then train shards 1..n_train (the hub copies number train shards from 1)."""
    return [f"{prefix}_val_{0:06d}.bin"] + [f"{prefix}_train_{i:06d}.bin" for i in range(1, n_train + 1)]


def is_valid_shard(path):
    """True when `path` exists and read_shard accepts it (magic, version, size)."""
    if not os.path.isfile(path):
        return False
    try:
        read_shard(path)
        return True
    except (DataError, OSError, ValueError):
        return False


def _hf_hub_download():
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise DataError("huggingface_hub is not installed: run `pip install huggingface_hub`, "
                        "or place the shard files in the output directory by hand")
    return hf_hub_download


def download_all(names, repo_id, out_dir, log=print):
    """Download every missing/invalid shard in `names`; returns (downloaded, skipped) counts."""
    os.makedirs(out_dir, exist_ok=True)
    downloaded = skipped = 0
    for k, name in enumerate(names, 1):
        path = os.path.join(out_dir, name)
        tag = f"[{k}/{len(names)}] {name}"
        if is_valid_shard(path):
            log(f"{tag}: present, skipped")
            skipped += 1
            continue
        stale = os.path.exists(path)
        hf_hub_download = _hf_hub_download()
        log(f"{tag}: {'invalid local copy, re-downloading' if stale else 'downloading'} from {repo_id} ...")
        t0 = time.time()
        try:
            got = hf_hub_download(repo_id=repo_id, filename=name, repo_type="dataset",
                                  local_dir=out_dir, force_download=stale)
        except Exception as e:  # network, auth, 404, disk: all reported the same one-line way
            msg = (str(e).strip().splitlines() or [""])[0][:200]
            raise DataError(
                f"could not download {name} from hf://datasets/{repo_id} ({type(e).__name__}: {msg}); "
                f"no network? copy the shards into {out_dir} by hand and re-run") from None
        got = os.path.abspath(got or path)
        if got != os.path.abspath(path):  # defensive: the hub put it elsewhere
            os.replace(got, path)
        if not is_valid_shard(path):
            raise DataError(f"downloaded {path} is not a valid shard (corrupt download?); delete it and re-run")
        size_mb = os.path.getsize(path) / 2**20
        log(f"{tag}: done, {size_mb:.0f} MB in {time.time() - t0:.1f}s")
        downloaded += 1
    return downloaded, skipped


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("num_train_shards", metavar="N", type=int,
                   help="number of training shards to fetch (each ~100M tokens); the val shard is always fetched")
    p.add_argument("--variant", choices=sorted(VARIANTS), default="10B",
                   help="which pre-tokenized copy: 10B = kjj0/fineweb10B-gpt2 (103 train shards), "
                        "100B = kjj0/fineweb100B-gpt2, edu10B = kjj0/finewebedu10B-gpt2 (99 train shards); "
                        "default 10B")
    p.add_argument("--out_dir", default=None,
                   help="directory for the shards (default data/fineweb10B, data/fineweb100B or "
                        "data/finewebedu10B according to --variant)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    repo_id, dir_name, prefix, max_train = VARIANTS[args.variant]
    out_dir = args.out_dir or str(REPO_ROOT / "data" / dir_name)
    try:
        if not 0 <= args.num_train_shards <= max_train:
            raise DataError(f"N must be between 0 and {max_train} for variant {args.variant}, "
                            f"got {args.num_train_shards}")
        names = shard_names(prefix, args.num_train_shards)
        downloaded, skipped = download_all(names, repo_id, out_dir)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 2
    print(f"{len(names)} shards in {out_dir}: {downloaded} downloaded, {skipped} already present")
    return 0


if __name__ == "__main__":
    sys.exit(main())
