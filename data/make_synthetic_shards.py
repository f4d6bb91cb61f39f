"""Write synthetic token shards (val + K train shards) in the training shard format.

    python data/make_synthetic_shards.py [--out_dir data/tiny_synthetic] [--train_shards 2]
        [--shard_tokens 1048576] [--val_tokens 262145] [--seed 0] [--overwrite]

For CPU-only smoke runs and benchmarks, where real FineWeb shards are not available. The tokens
are learnable: documents (each preceded by EOT 50256, lengths uniform in [--min_doc_len,
--max_doc_len]) are walks of a fixed random Markov chain over --n_symbols token ids scattered over
the GPT-2 vocabulary, each symbol having --branching equally likely successors. A model that
learns the chain reaches a loss of about ln(branching) (1.39 nats for 4) from ln(50257) = 10.8,
and the unigram statistics alone (ln(n_symbols)) come within a few steps, so a tiny model's loss
visibly falls. Val and train shards are consecutive pieces of one stream; same seed, same bytes.

Old data is never lost: the shards are written into a temporary folder beside --out_dir and replace
the old PREFIX_*.bin set only once all of them are written (tokenize_shards.staged_output). Exit
status: 0 done; 2 on any error (cannot write, interrupted), reported in one line on stderr.
"""

import argparse
import os
import sys
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "data"))
# the shard format and the replace-only-when-complete helper live in tokenize_shards.py
from tokenize_shards import EOT_TOKEN, refuse_to_mix, run_reporting_errors, staged_output, write_shard  # noqa: E402


def markov_stream(seed, n_symbols, branching, min_len, max_len, docs_per_chunk=2048):
    """Yields uint16 arrays: concatenated documents [EOT, walk...] of one seeded Markov chain."""
    rng = np.random.default_rng(seed)
    ids = rng.choice(EOT_TOKEN, size=n_symbols, replace=False).astype(np.uint16)  # symbol -> token id
    succ = rng.integers(0, n_symbols, size=(n_symbols, branching))               # successor table
    while True:
        lens = rng.integers(min_len, max_len + 1, size=docs_per_chunk)
        steps = rng.integers(0, branching, size=(docs_per_chunk, max_len))
        cur = rng.integers(0, n_symbols, size=docs_per_chunk)
        walk = np.empty((docs_per_chunk, max_len + 1), dtype=np.uint16)
        walk[:, 0] = EOT_TOKEN
        for t in range(max_len):  # all documents step together
            walk[:, t + 1] = ids[cur]
            cur = succ[cur, steps[:, t]]
        keep = np.arange(max_len + 1)[None, :] <= lens[:, None]
        yield walk[keep]  # row-major: documents in order, each cut to its length


def take(stream, n, leftover):
    """The next n tokens of `stream`; returns (tokens, new leftover)."""
    parts, have = [leftover], len(leftover)
    while have < n:
        chunk = next(stream)
        parts.append(chunk)
        have += len(chunk)
    allt = np.concatenate(parts)
    return allt[:n], allt[n:]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", default=str(REPO_ROOT / "data" / "tiny_synthetic"),
                   help="output directory (default data/tiny_synthetic, git-ignored)")
    p.add_argument("--prefix", default="fineweb", help="file-name prefix: PREFIX_val_000000.bin, PREFIX_train_000001.bin, ... (default fineweb)")
    p.add_argument("--train_shards", type=int, default=2, help="number of train shards K (default 2)")
    p.add_argument("--shard_tokens", type=int, default=1_048_576, help="tokens per train shard (default 1,048,576)")
    p.add_argument("--val_tokens", type=int, default=262_145,
                   help="tokens in the val shard (default 262,145 = 2^18+1: train_gpt.py --val_tokens V needs V+1)")
    p.add_argument("--seed", type=int, default=0, help="random seed for the chain and the walks (default 0)")
    p.add_argument("--n_symbols", type=int, default=512, help="distinct token ids used (default 512, at most 50256)")
    p.add_argument("--branching", type=int, default=4, help="successors per symbol; sets the entropy floor ln(branching) (default 4)")
    p.add_argument("--min_doc_len", type=int, default=64, help="shortest document, in tokens after the EOT (default 64)")
    p.add_argument("--max_doc_len", type=int, default=1024, help="longest document, in tokens after the EOT (default 1024)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing PREFIX_*.bin shards in --out_dir once the new set is complete "
                        "(default: refuse to mix datasets)")
    args = p.parse_args(argv)
    if args.train_shards < 0 or args.shard_tokens < 1 or args.val_tokens < 1:
        p.error("need --train_shards >= 0, --shard_tokens >= 1, --val_tokens >= 1")
    if not 1 <= args.n_symbols <= EOT_TOKEN or args.branching < 1:
        p.error(f"need 1 <= --n_symbols <= {EOT_TOKEN} and --branching >= 1")
    if not 1 <= args.min_doc_len <= args.max_doc_len:
        p.error("need 1 <= --min_doc_len <= --max_doc_len")
    return args


def main(argv=None):
    args = parse_args(argv)
    status, n_shards = run_reporting_errors(lambda: run(args), args.out_dir)
    if status == 0:
        print(f"done: {n_shards} shards in {args.out_dir}")
    return status


def run(args):
    refuse_to_mix(args.out_dir, args.prefix, args.overwrite)
    with staged_output(args.out_dir, args.prefix) as staging:
        return write_shards(args, staging)


def write_shards(args, staging):
    """Writes the val shard and the train shards into `staging`; returns how many."""
    stream = markov_stream(args.seed, args.n_symbols, args.branching, args.min_doc_len, args.max_doc_len)
    leftover = np.empty(0, dtype=np.uint16)
    jobs = [("val", 0, args.val_tokens)] + [("train", i, args.shard_tokens) for i in range(1, args.train_shards + 1)]
    for split, idx, n in jobs:
        toks, leftover = take(stream, n, leftover)
        name = f"{args.prefix}_{split}_{idx:06d}.bin"
        write_shard(os.path.join(staging, name), toks)
        print(f"wrote {name} ({n:,} tokens)", flush=True)  # progress; the set is moved into --out_dir at the end
    return len(jobs)


if __name__ == "__main__":
    sys.exit(main())
