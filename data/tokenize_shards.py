"""Tokenize text with the GPT-2 BPE (tiktoken) into training shards of the llm.c/modded-nanoGPT format.

    python data/tokenize_shards.py INPUT... --out_dir DIR [--bpe_file ../shared/tokenizer/gpt2.tiktoken]
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
Shards are written with train_gpt.write_shard (atomic: tmp file, fsync, rename).

--shuffle_seed S reads ALL documents into memory and shuffles them before the split, so the val
shard is a sample of every source rather than the first file (inputs are often grouped by source).
Without it the order is the input order. Output is identical for any --workers value.
Bad input prints one line and exits with status 2.
"""

import argparse
import glob
import gzip
import itertools
import json
import multiprocessing as mp
import os
import random
import sys
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
from train_gpt import EOT_TOKEN, DataError, write_shard  # noqa: E402  (shard format lives in train_gpt.py)

# GPT-2 / r50k_base pre-tokenizer regex (same as tiktoken_ext.openai_public.r50k_pat_str)
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
SUFFIXES = (".jsonl", ".jsonl.gz", ".txt", ".parquet")


# ----------------------------------------------------------------------------- tokenizer

def load_encoding(bpe_file=None):
    """GPT-2 BPE: from a local .tiktoken ranks file, else tiktoken's own (honours TIKTOKEN_CACHE_DIR)."""
    import tiktoken
    if bpe_file:
        from tiktoken.load import load_tiktoken_bpe
        if not os.path.isfile(bpe_file):
            raise DataError(f"--bpe_file {bpe_file} does not exist")
        try:
            ranks = load_tiktoken_bpe(bpe_file)
        except Exception as e:
            raise DataError(f"--bpe_file {bpe_file} is not a tiktoken ranks file ({type(e).__name__}: {e})")
        if len(ranks) != EOT_TOKEN:
            raise DataError(f"--bpe_file {bpe_file} has {len(ranks)} ranks, the GPT-2 BPE has {EOT_TOKEN}")
        return tiktoken.Encoding(name="gpt2_local", pat_str=GPT2_PAT_STR, mergeable_ranks=ranks,
                                 special_tokens={"<|endoftext|>": EOT_TOKEN})
    errors = []
    for name in ("gpt2", "r50k_base"):  # identical ranks; r50k_base is the one SPEC's cache file names
        try:
            return tiktoken.get_encoding(name)
        except Exception as e:
            errors.append(f"{name}: {type(e).__name__}")
    raise DataError("could not load the GPT-2 BPE from tiktoken (" + ", ".join(errors) + "); offline? "
                    "pass --bpe_file ../shared/tokenizer/gpt2.tiktoken or set TIKTOKEN_CACHE_DIR")


_ENC = None


def _init_worker(bpe_file):
    global _ENC
    if _ENC is None:  # already inherited under the fork start method
        _ENC = load_encoding(bpe_file)


def encode_doc(text):
    """[EOT] + BPE tokens of one document, as uint16."""
    toks = _ENC.encode_ordinary(text)
    out = np.empty(len(toks) + 1, dtype=np.uint16)
    out[0] = EOT_TOKEN
    out[1:] = toks
    return out


# ----------------------------------------------------------------------------- inputs

def expand_inputs(paths):
    files = []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(f for f in glob.glob(os.path.join(p, "**", "*"), recursive=True)
                           if os.path.isfile(f) and f.endswith(SUFFIXES))
            if not found:
                raise DataError(f"directory {p} holds no {'/'.join(SUFFIXES)} files")
            files += found
        elif not os.path.isfile(p):
            raise DataError(f"input {p} does not exist")
        elif not p.endswith(SUFFIXES):
            raise DataError(f"input {p}: unsupported file type (expected {', '.join(SUFFIXES)})")
        else:
            files.append(p)
    return files


def _get_text(obj, field, where):
    if not isinstance(obj, dict) or field not in obj:
        raise DataError(f"{where}: no field {field!r} (set --text_field)")
    text = obj[field]
    if not isinstance(text, str):
        raise DataError(f"{where}: field {field!r} is {type(text).__name__}, not a string")
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
                        raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})")
                    yield _get_text(obj, field, f"{path}:{lineno}")
        elif path.endswith(".parquet"):
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)")
            pf = pq.ParquetFile(path)
            if field not in pf.schema_arrow.names:
                raise DataError(f"{path}: no column {field!r} (columns: {pf.schema_arrow.names}; set --text_field)")
            for batch in pf.iter_batches(columns=[field], batch_size=1024):
                for text in batch.column(0).to_pylist():
                    if text is not None and not isinstance(text, str):
                        raise DataError(f"{path}: column {field!r} is not a string column")
                    yield text or ""
    except (UnicodeDecodeError, gzip.BadGzipFile, EOFError, OSError) as e:
        raise DataError(f"{path}: cannot read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")


def iter_hf(name, config, split, field):
    try:
        import datasets
    except ImportError:
        raise DataError("--hf_dataset needs the `datasets` library (pip install datasets)")
    where = f"hf dataset {name}" + (f"/{config}" if config else "")
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
        for i, row in enumerate(ds):
            yield _get_text(row, field, f"{where} row {i}")
    except DataError:
        raise
    except Exception as e:
        msg = (str(e).strip().splitlines() or [""])[0][:200]
        raise DataError(f"{where}: could not stream ({type(e).__name__}: {msg}); no network?")


def iter_documents(args):
    if args.hf_dataset:
        docs = iter_hf(args.hf_dataset, args.hf_config, args.hf_split, args.text_field)
    else:
        docs = itertools.chain.from_iterable(iter_file(f, args.text_field) for f in expand_inputs(args.inputs))
    if args.max_docs is not None:
        docs = itertools.islice(docs, args.max_docs)
    if args.shuffle_seed is not None:
        docs = list(docs)
        random.Random(args.shuffle_seed).shuffle(docs)
    return iter(docs)  # an iterator: run() consumes it in batches


# ----------------------------------------------------------------------------- shard writer

class ShardWriter:
    """Fills the val shard (val_tokens) first, then train shards of shard_size, writing each when full."""

    def __init__(self, out_dir, prefix, shard_size, val_tokens):
        self.out_dir, self.prefix, self.shard_size = out_dir, prefix, shard_size
        self.is_val = val_tokens > 0
        self.index = 0 if self.is_val else 1
        self.buf = np.empty(val_tokens if self.is_val else shard_size, dtype=np.uint16)
        self.fill = 0
        self.written = []  # (path, n_tokens)

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
        path = os.path.join(self.out_dir, f"{self.prefix}_{split}_{self.index:06d}.bin")
        write_shard(path, self.buf[:self.fill])
        self.written.append((path, self.fill))
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
                   help="GPT-2 ranks file in tiktoken format, for offline use (e.g. ../shared/tokenizer/gpt2.tiktoken); "
                        "default: tiktoken.get_encoding('gpt2'), which honours TIKTOKEN_CACHE_DIR")
    p.add_argument("--workers", type=int, default=1,
                   help="processes encoding documents in parallel (order preserved, output identical; default 1)")
    p.add_argument("--max_docs", type=int, default=None, help="stop after this many input documents (default: all)")
    p.add_argument("--shuffle_seed", type=int, default=None,
                   help="shuffle documents with this seed before splitting into val/train (loads all documents "
                        "into memory); default: keep input order")
    p.add_argument("--overwrite", action="store_true",
                   help="delete existing PREFIX_*.bin shards in --out_dir first (default: refuse to mix runs)")
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


def run(args):
    from tqdm import tqdm
    global _ENC
    _ENC = load_encoding(args.bpe_file)  # fail early (and encode here when --workers 1)
    os.makedirs(args.out_dir, exist_ok=True)
    old = sorted(glob.glob(os.path.join(args.out_dir, f"{glob.escape(args.prefix)}_*.bin")))
    if old and not args.overwrite:
        raise DataError(f"{args.out_dir} already holds {len(old)} {args.prefix}_*.bin shards; "
                        "use --overwrite or another --out_dir")
    for f in old:
        os.remove(f)
    docs = iter_documents(args)
    writer = ShardWriter(args.out_dir, args.prefix, args.shard_size, args.val_tokens)
    n_docs = n_tokens = 0
    pool = mp.Pool(args.workers, initializer=_init_worker, initargs=(args.bpe_file,)) if args.workers > 1 else None
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
    except BaseException as e:  # a partial dataset would train without complaint: remove what this run wrote
        for path, _ in writer.written:
            os.remove(path)
        if isinstance(e, DataError) and writer.written:
            raise DataError(f"{e}; removed the {len(writer.written)} shards written before it") from None
        raise
    finally:
        bar.close()
        if pool:
            pool.terminate()
    if n_docs == 0:
        raise DataError("no documents in the input")
    return n_docs, n_tokens, writer.written


def main(argv=None):
    args = parse_args(argv)
    try:
        n_docs, n_tokens, written = run(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; the shards written so far were removed", file=sys.stderr)
        return 2
    n_val = sum(n for p, n in written if "_val_" in os.path.basename(p))
    n_train = [n for p, n in written if "_train_" in os.path.basename(p)]
    print(f"done: {n_docs:,} docs, {n_tokens:,} tokens -> {len(written)} shards in {args.out_dir} "
          f"(val {n_val:,} tokens; {len(n_train)} train shards, {sum(n_train):,} tokens)")
    if not n_train:
        print(f"warning: fewer tokens than --val_tokens ({args.val_tokens:,}); no train shard was written",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
