"""Token shards from the Python source of the installed packages whose folder names start with a..m.

    python3 data/python_corpus.py --out_dir gpu_data/pycorpus --bpe_file tok/gpt2.tiktoken

(the ranks file is tiktoken's r50k_base, identical to GPT-2's). The packages n-z are kept
out for an independent check, made later on purpose with
    python3 data/python_corpus.py --letters n-z --out_dir gpu_data/pycorpus_nz --bpe_file tok/gpt2.tiktoken

Read: the *.py files under every top-level folder of site-packages (--site_packages, default the
running interpreter's) whose first character, case-insensitive, is in --letters. Left out unread:
folders starting with '_', a digit or another letter; *.dist-info / *.egg-info; __pycache__;
single-file modules beside the folders (six.py); symlinks (never followed, so nothing outside the
chosen folders is opened); files over 256 KiB (mostly generated tables). A name found in two
site-packages folders is taken from the first, as Python imports it. Each file is one document,
decoded as strict UTF-8 (PEP 3120's default); files that are not valid UTF-8 or hold only
whitespace are skipped and counted, so the data holds no U+FFFD replacement characters.

Written: the file list is sorted (by package/relative/path), encoded ([50256] + GPT-2 BPE tokens,
in --workers processes; the bytes do not depend on --workers), the documents shuffled with --seed,
the first --val_share of them to fineweb_val_000000.bin, the rest to fineweb_train_000001.bin, ...
of --shard_size tokens (a document may span two). fineweb_manifest.json beside them records the
arguments, seed, versions, packages, skipped files and counts. All tokens are held in memory
(2 bytes each) until the shards are written. The manifest also uses the *.dist-info metadata
(folder names, top_level.txt, RECORD) to label package versions; no package folder outside
--letters is opened.

Old data is never lost (tokenize_shards.staged_output): the new set is written into a temporary
folder beside --out_dir and replaces the old fineweb_* files only when complete. Exit status: 0
done; 2 on any error (bad input, cannot write, interrupted), reported in one line on stderr.
"""

import argparse
import datetime
import hashlib
import json
import multiprocessing as mp
import os
import platform
import random
import re
import site
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
# the shard format, the GPT-2 encoding and the replace-only-when-complete helper live in tokenize_shards.py
from tokenize_shards import (DataError, ShardWriter, encode_doc, init_worker, load_encoding, refuse_to_mix,  # noqa: E402
                             run_reporting_errors, set_encoding, staged_output, write_shard)

PREFIX = "fineweb"                   # the shard names train_gpt.py and the other data scripts use
MAX_FILE_BYTES = 256 * 1024          # larger .py files are mostly generated data, not code
METADATA_SUFFIXES = (".dist-info", ".egg-info")
PROGRESS_SECONDS = 10


# ----------------------------------------------------------------------------- what to read

def parse_letters(spec):
    """'a-m' or 'a-c,x' -> the set of allowed first characters (lower case); None if malformed."""
    letters = set()
    for part in spec.lower().replace(" ", "").split(","):
        if re.fullmatch(r"[a-z]-[a-z]", part) and part[0] <= part[2]:
            letters |= {chr(c) for c in range(ord(part[0]), ord(part[2]) + 1)}
        elif re.fullmatch(r"[a-z]+", part):
            letters |= set(part)
        else:
            return None
    return letters


def default_site_packages():
    """The running interpreter's site-packages folders (a venv's own, or the system's)."""
    return site.getsitepackages() + [sysconfig.get_paths()["purelib"]]


def check_site_dirs(dirs):
    """The folders, each once, in order; every one must exist."""
    unique = []
    for d in dirs:
        if not os.path.isdir(d):
            raise DataError(f"--site_packages {d} is not a folder; check the path")
        if os.path.realpath(d) not in map(os.path.realpath, unique):
            unique.append(d)
    return unique


def select_packages(site_dirs, letters):
    """Sorted [(name, folder)] of the top-level package folders whose first character is in letters."""
    chosen = {}
    for site_dir in site_dirs:
        for name in sorted(os.listdir(site_dir)):
            if name[0].lower() not in letters or name.endswith(METADATA_SUFFIXES):
                continue  # checked first: a folder outside --letters is not even looked at
            folder = os.path.join(site_dir, name)
            if os.path.isdir(folder) and not os.path.islink(folder):
                chosen.setdefault(name, folder)  # the first site dir wins, as on sys.path
    return sorted(chosen.items())


def list_sources(packages):
    """(sources, too_big): sorted [(package/relative/path.py, path)] to read, and the relative paths skipped
    for size."""
    sources, too_big = [], []
    for name, folder in packages:
        for root, dirs, files in os.walk(folder):  # symlinked folders are listed in dirs but not entered
            dirs[:] = [d for d in dirs if d != "__pycache__" and not d.endswith(METADATA_SUFFIXES)]
            for file in files:
                path = os.path.join(root, file)
                if not file.endswith(".py") or os.path.islink(path):
                    continue
                rel = name + "/" + os.path.relpath(path, folder).replace(os.sep, "/")
                if os.path.getsize(path) > MAX_FILE_BYTES:
                    too_big.append(rel)
                else:
                    sources.append((rel, path))
    return sorted(sources), sorted(too_big)


def top_level_names(meta_dir):
    """Top-level names a distribution installs: its top_level.txt, else the first path parts in RECORD."""
    for file, first_part in (("top_level.txt", lambda line: line),
                             ("RECORD", lambda line: line.split(",")[0].split("/")[0])):
        try:
            with open(os.path.join(meta_dir, file), encoding="utf-8", errors="replace") as f:
                return {first_part(line.strip()) for line in f if line.strip()}
        except OSError:
            continue
    return set()


def installed_versions(site_dirs):
    """Top-level folder name -> version, from the metadata folders (NAME-VERSION.dist-info) only."""
    versions = {}
    for site_dir in site_dirs:
        for entry in sorted(os.listdir(site_dir)):
            parts = entry.rsplit(".", 1)[0].split("-")
            if entry.endswith(METADATA_SUFFIXES) and len(parts) >= 2:
                for top in top_level_names(os.path.join(site_dir, entry)):
                    versions.setdefault(top, parts[1])
    return versions


# ----------------------------------------------------------------------------- tokenizing

def read_and_encode(path):
    """('ok', [EOT] + tokens) for one file, or ('undecodable' | 'empty' | 'unreadable', None)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return "unreadable", None
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")  # a BOM is an encoding mark, not source
    except UnicodeDecodeError:
        return "undecodable", None
    if not text.strip():
        return "empty", None  # a lone EOT teaches nothing
    return "ok", encode_doc(text)


class Progress:
    """A line on stderr every PROGRESS_SECONDS, so a long run shows it is alive (no tqdm needed)."""

    def __init__(self, total):
        self.total, self.done, self.tokens = total, 0, 0
        self.start = self.last = time.time()

    def update(self, n_tokens):
        self.done += 1
        self.tokens += n_tokens
        now = time.time()
        if now - self.last >= PROGRESS_SECONDS or self.done == self.total:
            self.last = now
            print(f"tokenized {self.done:,}/{self.total:,} files, {self.tokens:,} tokens, {now - self.start:.0f} s",
                  file=sys.stderr, flush=True)


def tokenize_sources(sources, bpe_file, workers):
    """(docs, skipped): [(relative path, tokens)] in the order of sources, and the skipped paths by reason."""
    paths = [path for _, path in sources]
    pool = mp.Pool(workers, initializer=init_worker, initargs=(bpe_file,)) if workers > 1 else None
    docs, skipped = [], {"undecodable": [], "empty": [], "unreadable": []}
    progress = Progress(len(paths))
    try:
        results = pool.imap(read_and_encode, paths, chunksize=8) if pool else map(read_and_encode, paths)
        for (rel, _), (status, tokens) in zip(sources, results):  # imap keeps the order: same bytes for any workers
            if tokens is None:
                skipped[status].append(rel)
            else:
                docs.append((rel, tokens))
            progress.update(0 if tokens is None else len(tokens))
    finally:
        if pool:
            pool.terminate()
    return docs, skipped


def split_documents(docs, seed, val_share):
    """(val, train) after a seeded shuffle; val holds round(val_share * n) documents, at least one."""
    if len(docs) < 2:
        raise DataError(f"only {len(docs)} documents found, a val and a train split need 2; "
                        "check --site_packages and --letters")
    shuffled = list(docs)
    random.Random(seed).shuffle(shuffled)
    n_val = min(max(round(val_share * len(docs)), 1), len(docs) - 1)
    return shuffled[:n_val], shuffled[n_val:]


def write_corpus(staging, val_docs, train_docs, shard_size):
    """Writes the val shard and the train shards into staging; returns [(file name, n_tokens)]."""
    val = np.concatenate([tokens for _, tokens in val_docs])
    val_name = f"{PREFIX}_val_000000.bin"
    write_shard(os.path.join(staging, val_name), val)
    writer = ShardWriter(staging, PREFIX, shard_size, val_tokens=0)  # val_tokens=0: train shards from index 1
    for _, tokens in train_docs:
        writer.add(tokens)
    writer.flush()
    return [(val_name, len(val))] + writer.written


# ----------------------------------------------------------------------------- the record

def file_sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def make_manifest(args, site_dirs, versions, val_docs, train_docs, too_big, skipped, shards, seconds):
    import tiktoken
    per_package = {}
    for rel, _ in val_docs + train_docs:
        name = rel.split("/", 1)[0]
        per_package[name] = per_package.get(name, 0) + 1
    return {
        "recipe": "data/python_corpus.py",
        "args": vars(args),
        "seed": args.seed,
        "letters": "".join(sorted(parse_letters(args.letters))),
        "site_packages": [os.path.abspath(d) for d in site_dirs],
        "max_file_bytes": MAX_FILE_BYTES,
        "python": platform.python_version(),
        "tiktoken": getattr(tiktoken, "__version__", None),
        "bpe_sha256": file_sha256(args.bpe_file) if args.bpe_file else None,
        "packages": [{"name": name, "version": versions.get(name), "documents": n}
                     for name, n in sorted(per_package.items())],
        "documents": {"val": len(val_docs), "train": len(train_docs)},
        "skipped": {"too_big": too_big, **skipped},
        "tokens": {"val": shards[0][1], "train": sum(n for _, n in shards[1:])},
        "shards": [{"file": name, "tokens": n} for name, n in shards],
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(seconds, 1),
    }


def write_manifest(path, manifest):
    try:
        with open(path, "w") as f:
            json.dump(manifest, f, indent=1)
    except OSError as e:
        raise DataError(f"cannot write {os.path.basename(path)} ({e.strerror or e}); free disk space or "
                        "choose another --out_dir") from None


def print_summary(manifest, out_dir):
    skipped = manifest["skipped"]
    names = [p["name"] for p in manifest["packages"]]
    tokens, docs = manifest["tokens"], manifest["documents"]
    print(f"packages: {len(names)} ({', '.join(names)})")
    print(f"documents: {docs['val'] + docs['train']:,} (val {docs['val']:,}, train {docs['train']:,})")
    print(f"files skipped: {len(skipped['too_big']):,} over {MAX_FILE_BYTES:,} bytes, {len(skipped['undecodable']):,} "
          f"not UTF-8, {len(skipped['empty']):,} empty, {len(skipped['unreadable']):,} unreadable")
    print(f"tokens: val {tokens['val']:,}, train {tokens['train']:,}")
    print(f"shards: {len(manifest['shards'])} in {out_dir} (1 val, {len(manifest['shards']) - 1} train), "
          f"manifest {PREFIX}_manifest.json")
    print(f"time: {manifest['seconds']:.1f} s")
    if tokens["val"] < 10_485_761:  # train_gpt.py's default --val_tokens 10,485,760 needs one more (shifted targets)
        print(f"note: the val shard holds {tokens['val']:,} tokens; run train_gpt.py with --val_tokens at most "
              f"{tokens['val'] - 1:,}", file=sys.stderr)


# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", required=True, help="folder for the shards and the manifest (created if missing)")
    p.add_argument("--site_packages", action="append", default=None, metavar="DIR",
                   help="a site-packages folder to read (repeatable); default: this interpreter's "
                        "(site.getsitepackages() and purelib)")
    p.add_argument("--letters", default="a-m",
                   help="first characters of the package folders to read, case-insensitive: a range 'a-m', "
                        "letters 'abc', or a comma list 'a-c,x' (default a-m; n-z is kept for an independent check)")
    p.add_argument("--bpe_file", default=None,
                   help="GPT-2 ranks file in tiktoken format, for offline use (e.g. tok/gpt2.tiktoken); "
                        "default: tiktoken.get_encoding('gpt2'), which needs its cache or the network")
    p.add_argument("--seed", type=int, default=1234, help="seed of the document shuffle (default 1234)")
    p.add_argument("--val_share", type=float, default=0.02,
                   help="share of the documents in the val shard, in (0, 1) (default 0.02)")
    p.add_argument("--shard_size", type=int, default=100_000_000,
                   help="tokens per train shard (default 100,000,000; max 2^31-1)")
    p.add_argument("--workers", type=int, default=os.cpu_count(),
                   help="processes reading and encoding files (the output does not depend on it; default: all CPUs)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing fineweb_* files in --out_dir once the new set is complete "
                        "(default: refuse to mix datasets)")
    args = p.parse_args(argv)
    if parse_letters(args.letters) is None:
        p.error(f"--letters {args.letters!r}: give a range like a-m, letters like abc, or a comma list like a-c,x")
    if not 0 < args.val_share < 1:
        p.error("--val_share must be in (0, 1)")
    if not 0 < args.shard_size < 2**31:
        p.error("--shard_size must be in [1, 2^31-1]")
    if args.workers < 1:
        p.error("--workers must be >= 1")
    return args


def build(args):
    """Reads, encodes, splits and writes the corpus; returns the manifest."""
    start = time.time()
    refuse_to_mix(args.out_dir, PREFIX, args.overwrite)
    site_dirs = check_site_dirs(args.site_packages or [d for d in default_site_packages() if os.path.isdir(d)])
    packages = select_packages(site_dirs, parse_letters(args.letters))
    if not packages:
        raise DataError(f"no package folders starting with {args.letters} in {', '.join(site_dirs)}; "
                        "check --site_packages and --letters")
    sources, too_big = list_sources(packages)
    print(f"reading {len(sources):,} files of {len(packages)} package folders with {args.workers} workers",
          file=sys.stderr, flush=True)
    set_encoding(load_encoding(args.bpe_file))  # fail early; with --workers > 1 the workers inherit it
    docs, skipped = tokenize_sources(sources, args.bpe_file, args.workers)
    val_docs, train_docs = split_documents(docs, args.seed, args.val_share)
    with staged_output(args.out_dir, PREFIX) as staging:
        shards = write_corpus(staging, val_docs, train_docs, args.shard_size)
        manifest = make_manifest(args, site_dirs, installed_versions(site_dirs), val_docs, train_docs, too_big,
                                 skipped, shards, time.time() - start)
        write_manifest(os.path.join(staging, f"{PREFIX}_manifest.json"), manifest)
    return manifest


def main(argv=None):
    args = parse_args(argv)
    status, manifest = run_reporting_errors(lambda: build(args), args.out_dir)
    if status == 0:
        print_summary(manifest, args.out_dir)
    return status


if __name__ == "__main__":
    sys.exit(main())
