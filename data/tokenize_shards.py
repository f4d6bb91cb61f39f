"""Tokenize text with the GPT-2 BPE (tiktoken) into training shards of the llm.c/modded-nanoGPT format.

    python data/tokenize_shards.py INPUT... --out_dir DIR [--bpe_file gpt2.tiktoken]
    python data/tokenize_shards.py --hf_dataset HuggingFaceFW/fineweb --hf_config sample-10BT --out_dir DIR

Inputs (files, or directories searched recursively for these kinds, in sorted order):
  *.jsonl / *.jsonl.gz   one JSON object per line, text in --text_field (default "text")
  *.txt                  the whole file is one document
  *.parquet              column --text_field (needs pyarrow)
or --hf_dataset NAME [--hf_config C] [--hf_split S] streamed with the `datasets` library.

Every document becomes [50256 (<|endoftext|>)] + its tokens (encode_ordinary: special-token text
inside documents is ordinary text). The token stream is cut into shards, a document may span two:
  {prefix}_val_000000.bin     the first --val_tokens tokens (skipped when --val_tokens 0)
  {prefix}_train_000001.bin   then --shard_size tokens each, the last one shorter

--shuffle_seed S reads ALL documents into memory and shuffles them before the split, so the val
shard is a sample of every source rather than the first file (inputs are often grouped by source).
Without it the order is the input order. Output is identical for any --workers value.

Old data is never lost: every input path is checked before any work, the new shards are written
into a temporary folder beside DIR (DIR.tmp-*), and only a complete new set replaces the old
{prefix}_*.bin files (those the new set does not overwrite are removed). A failure at any point
(bad input, full disk, Ctrl-C) leaves DIR exactly as it was and removes the temporary folder.
Exit status: 0 done; 2 on any error (bad input, cannot write, interrupted), reported in one line
"error: <what>; <what to do>" on stderr.

This file is also the home of the shard-format writer and the replace-only-when-complete helper
(staged_output) that data/make_synthetic_shards.py and data/python_corpus.py use. Data scripts
write the format themselves with numpy; they do not import torch or train_gpt.py.
"""

import argparse
import contextlib
import glob
import gzip
import itertools
import json
import multiprocessing as mp
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

# The shard format (SPEC section 3); train_gpt.py reads it and must agree.
SHARD_MAGIC = 20240520
SHARD_VERSION = 1
SHARD_HEADER_INTS = 256
EOT_TOKEN = 50256  # <|endoftext|>, first token of every document

# GPT-2 / r50k_base pre-tokenizer regex (same as tiktoken_ext.openai_public.r50k_pat_str)
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
SUFFIXES = (".jsonl", ".jsonl.gz", ".txt", ".parquet")


class DataError(Exception):
    """Bad input or an output that cannot be written; the message says what and what to do."""


class OldShardsStranded(DataError):
    """Publishing failed and undoing it failed too: the old shards wait in the temporary folder."""


# ----------------------------------------------------------------------------- shard files

def write_shard(path, tokens):
    """One shard file: 256 int32 header (magic, version, token count), then the tokens as uint16."""
    tokens = np.asarray(tokens)
    if tokens.size >= 2**31:
        raise DataError(f"{Path(path).name}: {tokens.size:,} tokens do not fit the int32 header; use smaller shards")
    if tokens.dtype != np.uint16 and tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise DataError(f"{Path(path).name}: token ids must lie in [0, 65535] to fit uint16")
    header = np.zeros(SHARD_HEADER_INTS, dtype=np.int32)
    header[:3] = (SHARD_MAGIC, SHARD_VERSION, tokens.size)
    try:
        with open(path, "wb") as f:
            f.write(header.tobytes())
            f.write(tokens.astype(np.uint16, copy=False).tobytes())
            f.flush()
            os.fsync(f.fileno())  # the shard is on disk before it can replace an old one
    except OSError as e:
        raise DataError(f"cannot write shard {Path(path).name} ({e.strerror or e}); "
                        "free disk space (or raise the file-size limit) or choose another --out_dir") from None


def shard_files(out_dir, prefix):
    """The PREFIX_*.bin shards in out_dir, sorted."""
    return sorted(glob.glob(os.path.join(glob.escape(str(out_dir)), f"{glob.escape(prefix)}_*.bin")))


def owned_files(out_dir, prefix):
    """Everything a run with this prefix owns in out_dir: its shards and its manifest."""
    manifest = os.path.join(out_dir, f"{prefix}_manifest.json")
    return shard_files(out_dir, prefix) + ([manifest] if os.path.isfile(manifest) else [])


def refuse_to_mix(out_dir, prefix, overwrite):
    """Two runs' shards in one folder would train on both without complaint."""
    old = shard_files(out_dir, prefix)
    if old and not overwrite:
        raise DataError(f"{out_dir} already holds {len(old)} {prefix}_*.bin shards; use --overwrite or another --out_dir")


# ----------------------------------------------------------------------------- replace only when complete

@contextlib.contextmanager
def sigint_ignored():
    """Ctrl-C cannot split a few renames in two (only the main thread may set signal handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)


def make_staging_dir(out_dir):
    """An empty folder on out_dir's file system (so publishing is renames only): beside out_dir,
    or inside it when out_dir is a mount point (its parent is another file system)."""
    if os.path.ismount(out_dir):
        parent, name = out_dir, f".{out_dir.name or 'out'}.tmp-{os.getpid()}-"
    else:
        parent, name = out_dir.parent, f"{out_dir.name}.tmp-{os.getpid()}-"
    try:
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=name, dir=parent))
    except OSError as e:
        raise DataError(f"cannot write shards to {out_dir}: cannot create a temporary folder in {parent} "
                        f"({e.strerror or e}); make {parent} writable or choose another --out_dir") from None


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(staging, out_dir, prefix):
    """Moves the old PREFIX files of out_dir into staging/.retired and the new ones from staging into
    out_dir; if a rename fails, the ones done are undone, so out_dir keeps the old set."""
    out_dir.mkdir(parents=True, exist_ok=True)
    retired = staging / ".retired"
    retired.mkdir()
    new = sorted(p.name for p in staging.iterdir() if p != retired)
    moves = [(Path(p), retired / Path(p).name) for p in owned_files(out_dir, prefix)]
    moves += [(staging / name, out_dir / name) for name in new]
    done = []
    try:
        for src, dst in moves:
            os.replace(src, dst)
            done.append((src, dst))
    except OSError as e:
        try:
            for src, dst in reversed(done):
                os.replace(dst, src)
        except OSError:
            raise OldShardsStranded(f"cannot move the new shards into {out_dir} ({e.strerror or e}) nor the old ones "
                                    f"back; move the files of {retired} back into {out_dir} by hand") from None
        raise DataError(f"cannot move the new shards into {out_dir} ({e.strerror or e}); "
                        "check its permissions and free space, then run again") from None
    with contextlib.suppress(OSError):  # durability of the renames; some file systems cannot fsync a folder
        fsync_dir(out_dir)


@contextlib.contextmanager
def staged_output(out_dir, prefix):
    """Yields an empty folder for a new set of shards. When the block ends normally the set replaces
    the PREFIX files of out_dir; when it raises (anything, Ctrl-C too) out_dir is left exactly as it
    was. The folder is removed either way."""
    out_dir = Path(os.path.realpath(out_dir))  # a symlinked out_dir: stage on the file system it points to
    staging = make_staging_dir(out_dir)
    keep_staging = False
    try:
        yield staging
        with sigint_ignored():
            publish(staging, out_dir, prefix)
    except OldShardsStranded:
        keep_staging = True  # it holds the only copy of the old shards
        raise
    finally:
        if not keep_staging:
            with sigint_ignored():
                shutil.rmtree(staging, ignore_errors=True)  # also deletes the retired old shards


def run_reporting_errors(work, out_dir):
    """(0, work()) or, for bad input, an unwritable output or Ctrl-C, one line on stderr and (2, None)."""
    try:
        return 0, work()
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"error: interrupted; {out_dir} was left as it was, run the command again", file=sys.stderr)
    return 2, None


# ----------------------------------------------------------------------------- tokenizer

def load_encoding(bpe_file=None):
    """GPT-2 BPE: from a local .tiktoken ranks file, else tiktoken's own (honours TIKTOKEN_CACHE_DIR)."""
    import tiktoken
    if bpe_file:
        from tiktoken.load import load_tiktoken_bpe
        if not os.path.isfile(bpe_file):
            raise DataError(f"--bpe_file {bpe_file} does not exist; check the path")
        try:
            ranks = load_tiktoken_bpe(bpe_file)
        except Exception as e:
            raise DataError(f"--bpe_file {bpe_file} is not a tiktoken ranks file ({type(e).__name__}: {e}); "
                            "pass GPT-2's gpt2.tiktoken")
        if len(ranks) != EOT_TOKEN:
            raise DataError(f"--bpe_file {bpe_file} has {len(ranks)} ranks, the GPT-2 BPE has {EOT_TOKEN}; "
                            "pass GPT-2's gpt2.tiktoken")
        return tiktoken.Encoding(name="gpt2_local", pat_str=GPT2_PAT_STR, mergeable_ranks=ranks,
                                 special_tokens={"<|endoftext|>": EOT_TOKEN})
    errors = []
    for name in ("gpt2", "r50k_base"):  # identical ranks; r50k_base is the one SPEC's cache file names
        try:
            return tiktoken.get_encoding(name)
        except Exception as e:
            errors.append(f"{name}: {type(e).__name__}")
    raise DataError("could not load the GPT-2 BPE from tiktoken (" + ", ".join(errors) + "); offline? "
                    "pass --bpe_file PATH (a GPT-2 ranks file) or set TIKTOKEN_CACHE_DIR")


_ENC = None  # this process's encoding: set once, then used by encode_doc


def set_encoding(enc):
    global _ENC
    _ENC = enc


def init_worker(bpe_file):
    """Pool initializer: Ctrl-C is the main process's to handle (no traceback per worker)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if _ENC is None:  # already inherited under the fork start method
        set_encoding(load_encoding(bpe_file))


def encode_doc(text):
    """[EOT] + BPE tokens of one document, as uint16."""
    toks = _ENC.encode_ordinary(text)
    out = np.empty(len(toks) + 1, dtype=np.uint16)
    out[0] = EOT_TOKEN
    out[1:] = toks
    return out


# ----------------------------------------------------------------------------- inputs

def check_readable(path):
    """Opens the file before any work starts, so a typo or a permission problem costs nothing."""
    try:
        with open(path, "rb") as f:
            magic = f.read(2)
    except OSError as e:
        raise DataError(f"input {path} cannot be read ({e.strerror or e}); check the path and its permissions") from None
    if path.endswith(".gz") and magic != b"\x1f\x8b":
        raise DataError(f"input {path} is not gzip data; decompress or rename it")


def expand_inputs(paths):
    """The input files, in order; every one exists, has a known type and can be opened."""
    files = []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(f for f in glob.glob(os.path.join(glob.escape(p), "**", "*"), recursive=True)
                           if os.path.isfile(f) and f.endswith(SUFFIXES))
            if not found:
                raise DataError(f"directory {p} holds no {'/'.join(SUFFIXES)} files; check the path")
            files += found
        elif not os.path.exists(p):
            raise DataError(f"input {p} does not exist; check the path")
        elif not p.endswith(SUFFIXES):
            raise DataError(f"input {p}: unsupported file type; give {', '.join(SUFFIXES)} files")
        else:
            files.append(p)
    for f in files:
        check_readable(f)
    return files


def _get_text(obj, field, where):
    if not isinstance(obj, dict) or field not in obj:
        raise DataError(f"{where}: no field {field!r}; set --text_field")
    text = obj[field]
    if not isinstance(text, str):
        raise DataError(f"{where}: field {field!r} is {type(text).__name__}, not a string; set --text_field")
    return text


def iter_file(path, field):
    try:
        if path.endswith(".txt"):
            with open(path, encoding="utf-8") as f:
                yield f.read()
        elif path.endswith((".jsonl", ".jsonl.gz")):
            opener = gzip.open if path.endswith(".gz") else open
            with opener(path, "rt", encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg}); fix or remove that line")
                    yield _get_text(obj, field, f"{path}:{lineno}")
        elif path.endswith(".parquet"):
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise DataError(f"{path}: reading parquet needs pyarrow; pip install pyarrow")
            pf = pq.ParquetFile(path)
            if field not in pf.schema_arrow.names:
                raise DataError(f"{path}: no column {field!r} (columns: {pf.schema_arrow.names}); set --text_field")
            for batch in pf.iter_batches(columns=[field], batch_size=1024):
                for text in batch.column(0).to_pylist():
                    if text is not None and not isinstance(text, str):
                        raise DataError(f"{path}: column {field!r} is not a string column; set --text_field")
                    yield text or ""
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError, OSError) as e:
        detail = str(e).splitlines()[0] if str(e) else ""
        raise DataError(f"{path}: cannot read ({type(e).__name__}: {detail}); fix or leave out that file") from None


def iter_hf(name, config, split, field):
    try:
        import datasets
    except ImportError:
        raise DataError("--hf_dataset needs the `datasets` library; pip install datasets")
    where = f"hf dataset {name}" + (f"/{config}" if config else "")
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
        for i, row in enumerate(ds):
            yield _get_text(row, field, f"{where} row {i}")
    except DataError:
        raise
    except Exception as e:
        msg = (str(e).strip().splitlines() or [""])[0][:200]
        raise DataError(f"{where}: could not stream ({type(e).__name__}: {msg}); check the network and the name")


def iter_documents(args, files):
    if args.hf_dataset:
        docs = iter_hf(args.hf_dataset, args.hf_config, args.hf_split, args.text_field)
    else:
        docs = itertools.chain.from_iterable(iter_file(f, args.text_field) for f in files)
    if args.max_docs is not None:
        docs = itertools.islice(docs, args.max_docs)
    if args.shuffle_seed is not None:
        docs = list(docs)
        random.Random(args.shuffle_seed).shuffle(docs)
    return iter(docs)  # an iterator: tokenize_into() consumes it in batches


# ----------------------------------------------------------------------------- shard writer

class ShardWriter:
    """Fills the val shard (val_tokens) first, then train shards of shard_size, writing each when full."""

    def __init__(self, out_dir, prefix, shard_size, val_tokens):
        self.out_dir, self.prefix, self.shard_size = out_dir, prefix, shard_size
        self.is_val = val_tokens > 0
        self.index = 0 if self.is_val else 1
        self.buf = np.empty(val_tokens if self.is_val else shard_size, dtype=np.uint16)
        self.fill = 0
        self.written = []  # (file name, n_tokens)

    def add(self, toks):
        while len(toks):
            n = min(len(toks), len(self.buf) - self.fill)
            self.buf[self.fill:self.fill + n] = toks[:n]
            self.fill += n
            toks = toks[n:]
            if self.fill == len(self.buf):
                self.flush()

    def flush(self):
        if self.fill == 0:
            return
        split = "val" if self.is_val else "train"
        name = f"{self.prefix}_{split}_{self.index:06d}.bin"
        write_shard(os.path.join(self.out_dir, name), self.buf[:self.fill])
        self.written.append((name, self.fill))
        self.index += 1
        if self.is_val:
            self.is_val = False
            self.buf = np.empty(self.shard_size, dtype=np.uint16)
        self.fill = 0


# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="*", help="input files or directories (.jsonl, .jsonl.gz, .txt, .parquet)")
    p.add_argument("--out_dir", required=True, help="directory for the shards (created if missing)")
    p.add_argument("--prefix", default="fineweb",
                   help="shard file-name prefix: PREFIX_val_000000.bin, PREFIX_train_000001.bin, ... (default fineweb)")
    p.add_argument("--shard_size", type=int, default=100_000_000,
                   help="tokens per train shard (default 100,000,000; max 2^31-1)")
    p.add_argument("--val_tokens", type=int, default=10_485_761,
                   help="tokens in the val shard, taken from the start of the stream; 0 = no val shard. "
                        "train_gpt.py --val_tokens V needs at least V+1 (shifted targets), so the default "
                        "10,485,761 fits its default V = 10,485,760 (SPEC section 3)")
    p.add_argument("--text_field", default="text", help="JSON key / parquet column / HF column holding the text (default text)")
    p.add_argument("--hf_dataset", default=None, help="stream this Hugging Face dataset instead of local inputs (needs `datasets` and network)")
    p.add_argument("--hf_config", default=None, help="configuration name of --hf_dataset, e.g. sample-10BT")
    p.add_argument("--hf_split", default="train", help="split of --hf_dataset (default train)")
    p.add_argument("--bpe_file", default=None,
                   help="GPT-2 ranks file in tiktoken format, for offline use (e.g. tok/gpt2.tiktoken); "
                        "default: tiktoken.get_encoding('gpt2'), which honours TIKTOKEN_CACHE_DIR")
    p.add_argument("--workers", type=int, default=1,
                   help="processes encoding documents in parallel (order preserved, output identical; default 1)")
    p.add_argument("--max_docs", type=int, default=None, help="stop after this many input documents (default: all)")
    p.add_argument("--shuffle_seed", type=int, default=None,
                   help="shuffle documents with this seed before splitting into val/train (loads all documents "
                        "into memory); default: keep input order")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing PREFIX_*.bin shards in --out_dir once the new set is complete "
                        "(default: refuse to mix runs)")
    args = p.parse_args(argv)
    if bool(args.inputs) == bool(args.hf_dataset):
        p.error("give input files/directories or --hf_dataset (exactly one of them)")
    if not 0 < args.shard_size < 2**31:
        p.error("--shard_size must be in [1, 2^31-1]")
    if not 0 <= args.val_tokens < 2**31:
        p.error("--val_tokens must be in [0, 2^31-1]")
    if args.workers < 1:
        p.error("--workers must be >= 1")
    if args.max_docs is not None and args.max_docs < 0:
        p.error("--max_docs must be >= 0")
    return args


def tokenize_into(staging, args, files):
    """Tokenizes every document into shards in `staging`; returns (n_docs, n_tokens, [(name, n_tokens)])."""
    from tqdm import tqdm
    docs = iter_documents(args, files)
    writer = ShardWriter(staging, args.prefix, args.shard_size, args.val_tokens)
    n_docs = n_tokens = 0
    pool = mp.Pool(args.workers, initializer=init_worker, initargs=(args.bpe_file,)) if args.workers > 1 else None
    bar = tqdm(desc="tokenizing", unit=" docs", total=args.max_docs, file=sys.stderr, dynamic_ncols=True)
    try:
        while True:
            batch = list(itertools.islice(docs, 1024 * args.workers))  # read in the main process
            if not batch:
                break
            encoded = pool.imap(encode_doc, batch, chunksize=16) if pool else map(encode_doc, batch)
            for toks in encoded:
                writer.add(toks)
                n_tokens += len(toks)
            n_docs += len(batch)
            bar.update(len(batch))
            bar.set_postfix(tokens=f"{n_tokens:,}", shards=len(writer.written))
        writer.flush()
    finally:
        bar.close()
        if pool:
            pool.terminate()
    if n_docs == 0:
        raise DataError("no documents in the input; check the inputs (and --max_docs)")
    return n_docs, n_tokens, writer.written


def run(args):
    refuse_to_mix(args.out_dir, args.prefix, args.overwrite)
    files = None if args.hf_dataset else expand_inputs(args.inputs)  # every input checked before any work
    set_encoding(load_encoding(args.bpe_file))  # fail early (and encode here when --workers 1)
    with staged_output(args.out_dir, args.prefix) as staging:
        return tokenize_into(staging, args, files)


def main(argv=None):
    args = parse_args(argv)
    status, result = run_reporting_errors(lambda: run(args), args.out_dir)
    if status:
        return status
    n_docs, n_tokens, written = result
    n_val = sum(n for name, n in written if "_val_" in name)
    n_train = [n for name, n in written if "_train_" in name]
    print(f"done: {n_docs:,} docs, {n_tokens:,} tokens -> {len(written)} shards in {args.out_dir} "
          f"(val {n_val:,} tokens; {len(n_train)} train shards, {sum(n_train):,} tokens)")
    if not n_train:
        print(f"warning: fewer tokens than --val_tokens ({args.val_tokens:,}); no train shard was written",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
