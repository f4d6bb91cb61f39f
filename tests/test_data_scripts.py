"""Tests of the data scripts: data/tokenize_shards.py, data/make_synthetic_shards.py, data/python_corpus.py,
data/cached_fineweb10B.py.

CPU only, no network: tokenization uses the offline GPT-2 ranks in ../shared/tokenizer when that
checkout is present, else a stand-in ranks file of GPT-2's size (every byte, then byte pairs), so
these tests run on a clean clone too. The Hugging Face download is replaced by a fake
`huggingface_hub` module.
"""

import base64
import gzip
import hashlib
import os
import importlib.util
import json
import signal
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from train_gpt import EOT_TOKEN, SHARD_HEADER_INTS, SHARD_MAGIC, SHARD_VERSION, read_shard, write_shard  # noqa: E402

SHARED_BPE_FILE = REPO.parent / "shared" / "tokenizer" / "gpt2.tiktoken"
DATA = REPO / "data"


def run_script(name, *args):
    return subprocess.run([sys.executable, str(DATA / name), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def last_line(stream):
    lines = [l for l in stream.replace("\r", "\n").splitlines() if l.strip()]
    return lines[-1] if lines else ""


def load_module(name):
    spec = importlib.util.spec_from_file_location(name, DATA / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # so multiprocessing can pickle its functions (--workers 2)
    spec.loader.exec_module(mod)
    return mod


def header(path):
    return np.fromfile(path, dtype=np.int32, count=SHARD_HEADER_INTS)


def digests(folder):
    """name -> sha256 of every file in folder: a changed, lost or added file shows."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).iterdir())}


def leftovers(root):
    """Temporary files or folders anywhere under root."""
    return [p for p in Path(root).rglob("*") if ".tmp" in p.name]


def error_lines(stderr):
    return [l for l in stderr.replace("\r", "\n").splitlines() if l.startswith("error:")]


# ----------------------------------------------------------------------------- tokenize_shards.py

@pytest.fixture(scope="module")
def bpe_file(tmp_path_factory):
    """GPT-2's ranks, or a stand-in with as many ranks: the 256 bytes, then byte pairs in order."""
    if SHARED_BPE_FILE.is_file():
        return SHARED_BPE_FILE
    tokens = [bytes([b]) for b in range(256)] + [bytes([a, b]) for a in range(256) for b in range(256)]
    path = tmp_path_factory.mktemp("bpe") / "standin.tiktoken"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {rank}\n" for rank, t in enumerate(tokens[:EOT_TOKEN])))
    return path


@pytest.fixture(scope="module")
def bpe(bpe_file):
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    tok = load_module("tokenize_shards")
    ranks = load_tiktoken_bpe(str(bpe_file))
    return tiktoken.Encoding(name="gpt2_test", pat_str=tok.GPT2_PAT_STR, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": EOT_TOKEN})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A jsonl.gz with 60 varied documents (unicode, special-token text, blank lines) and one .txt document."""
    d = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    words = ["the", "cat", "Zürich", "naïve", "日本語", "emoji 🙂", "don't", "  spaced", "1234", "x\ny", "<|endoftext|>"]
    docs = [" ".join(rng.choice(words, size=int(rng.integers(1, 40)))) + f" doc {i}." for i in range(60)]
    jl = d / "part.jsonl.gz"
    with gzip.open(jl, "wt", encoding="utf-8") as f:
        for i, doc in enumerate(docs):
            f.write(json.dumps({"text": doc, "id": i}) + "\n")
            if i == 10:
                f.write("\n")  # blank lines are ignored
    txt = d / "book.txt"
    txt_doc = "A plain text file is one document.\n\nIt has two paragraphs, and ends with a newline.\n"
    txt.write_text(txt_doc, encoding="utf-8")
    return [jl, txt], docs + [txt_doc]


def tokenize(inputs, out_dir, bpe_file, *extra, capsys=None):
    """Runs tokenize_shards.main in-process (a subprocess costs ~3 s of torch import); returns its stdout."""
    argv = [*inputs, "--out_dir", out_dir, "--bpe_file", bpe_file, *extra]
    assert load_module("tokenize_shards").main([str(a) for a in argv]) == 0
    return capsys.readouterr().out if capsys else None


def shard_files(out_dir):
    out_dir = Path(out_dir)
    return sorted(out_dir.glob("*_val_*.bin")) + sorted(out_dir.glob("*_train_*.bin"))


def split_docs(stream):
    starts = np.flatnonzero(stream == EOT_TOKEN)
    return [stream[a + 1:b] for a, b in zip(starts, list(starts[1:]) + [len(stream)])]


def test_tokenize_roundtrip_and_split(tmp_path, bpe, bpe_file, corpus, capsys):
    inputs, docs = corpus
    out = tokenize(inputs, tmp_path / "out", bpe_file, "--val_tokens", 100, "--shard_size", 256, capsys=capsys)
    files = shard_files(tmp_path / "out")
    names = [f.name for f in files]
    assert names[0] == "fineweb_val_000000.bin"
    assert names[1:] == [f"fineweb_train_{i:06d}.bin" for i in range(1, len(files))]
    # headers: magic, version and the true token count
    counts = []
    for f in files:
        h = header(f)
        counts.append(len(read_shard(f)))
        assert list(h[:3]) == [SHARD_MAGIC, SHARD_VERSION, counts[-1]]
    expected = [[EOT_TOKEN] + bpe.encode_ordinary(d) for d in docs]
    total = sum(map(len, expected))
    assert sum(counts) == total
    assert counts[0] == 100                                  # val = first val_tokens tokens
    assert all(c == 256 for c in counts[1:-1]) and 0 < counts[-1] <= 256  # full train shards, short last
    stream = np.concatenate([read_shard(f) for f in files])
    assert stream[0] == EOT_TOKEN
    assert np.array_equal(stream, np.concatenate(expected))  # EOT before every doc, docs in order
    assert int((stream == EOT_TOKEN).sum()) == len(docs)     # special-token text in a doc stays text
    assert [bpe.decode(d.tolist()) for d in split_docs(stream)] == docs
    assert f"{len(docs):,} docs, {total:,} tokens -> {len(files)} shards" in out


def test_tokenize_deterministic_across_workers(tmp_path, bpe_file, corpus):
    inputs, _ = corpus
    for w in (1, 2):
        tokenize(inputs, tmp_path / f"w{w}", bpe_file, "--val_tokens", 64, "--shard_size", 200, "--workers", w)
    a, b = shard_files(tmp_path / "w1"), shard_files(tmp_path / "w2")
    assert [f.name for f in a] == [f.name for f in b] and len(a) > 2
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b))


def test_tokenize_shuffle_and_options(tmp_path, bpe, bpe_file, corpus):
    inputs, docs = corpus
    tokenize(inputs[:1], tmp_path / "s", bpe_file, "--shuffle_seed", 3, "--val_tokens", 0, "--shard_size", 10**6,
             "--prefix", "mix", "--max_docs", 50, "--workers", 2)
    files = shard_files(tmp_path / "s")
    assert [f.name for f in files] == ["mix_train_000001.bin"]  # no val shard with --val_tokens 0
    got = [bpe.decode(d.tolist()) for d in split_docs(read_shard(files[0]))]
    assert sorted(got) == sorted(docs[:50]) and got != docs[:50]  # same first 50 docs, shuffled
    tokenize(inputs[:1], tmp_path / "s2", bpe_file, "--shuffle_seed", 3, "--val_tokens", 0, "--shard_size", 10**6,
             "--prefix", "mix", "--max_docs", 50)
    assert (tmp_path / "s2" / "mix_train_000001.bin").read_bytes() == files[0].read_bytes()


@pytest.mark.parametrize("content, expect", [
    ('{"text": "ok"}\n{"text": broken\n', "bad.jsonl:2: invalid JSON"),
    ('{"body": "no text field"}\n', "no field 'text'"),
])
def test_tokenize_bad_input_exits_2(tmp_path, bpe_file, content, expect):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    r = run_script("tokenize_shards.py", bad, "--out_dir", tmp_path / "out", "--bpe_file", bpe_file)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert last_line(r.stderr).startswith("error:") and expect in last_line(r.stderr)
    assert not list((tmp_path / "out").glob("*"))  # nothing written, nothing half-written


def test_tokenize_error_after_some_shards_leaves_nothing(tmp_path, bpe_file):
    good, bad = tmp_path / "a_good.jsonl", tmp_path / "z_bad.jsonl"
    good.write_text("".join(json.dumps({"text": f"document number {i} of the good file."}) + "\n" for i in range(1100)))
    bad.write_text('{"text": broken\n')
    out = tmp_path / "out"
    r = run_script("tokenize_shards.py", good, bad, "--out_dir", out, "--bpe_file", bpe_file, "--val_tokens", 64,
                   "--shard_size", 128)  # the first 1024 documents are written (staged) before the bad file is read
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "z_bad.jsonl:1: invalid JSON" in last_line(r.stderr) and "fix or remove that line" in last_line(r.stderr)
    assert not out.exists() and not leftovers(tmp_path)


def test_tokenize_refuses_to_mix_with_old_shards(tmp_path, bpe_file, corpus, capsys):
    inputs, _ = corpus
    tokenize(inputs, tmp_path / "o", bpe_file, "--val_tokens", 64, "--shard_size", 128)
    n_before = len(shard_files(tmp_path / "o"))
    tok = load_module("tokenize_shards")
    assert tok.main([*map(str, inputs), "--out_dir", str(tmp_path / "o"), "--bpe_file", str(bpe_file)]) == 2
    assert "--overwrite" in last_line(capsys.readouterr().err)
    tokenize(inputs, tmp_path / "o", bpe_file, "--val_tokens", 64, "--shard_size", 10**6, "--overwrite")
    assert n_before > 2 and len(shard_files(tmp_path / "o")) == 2  # old shards replaced, not mixed


# ----------------------------------------------------------------------------- make_synthetic_shards.py

def test_synthetic_shards(tmp_path):
    args = ["--train_shards", 2, "--shard_tokens", 5000, "--val_tokens", 2000, "--n_symbols", 64, "--branching", 3]
    r = run_script("make_synthetic_shards.py", "--out_dir", tmp_path / "a", "--seed", 0, *args)  # the real CLI
    assert r.returncode == 0, r.stderr
    synth = load_module("make_synthetic_shards")
    for name, seed in [("b", 0), ("c", 1)]:
        assert synth.main([str(a) for a in ["--out_dir", tmp_path / name, "--seed", seed, *args]]) == 0
    files = shard_files(tmp_path / "a")
    assert [f.name for f in files] == ["fineweb_val_000000.bin", "fineweb_train_000001.bin", "fineweb_train_000002.bin"]
    assert [len(read_shard(f)) for f in files] == [2000, 5000, 5000]
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(files, shard_files(tmp_path / "b")))  # seeded
    assert files[1].read_bytes() != shard_files(tmp_path / "c")[1].read_bytes()
    stream = np.concatenate([read_shard(f) for f in files]).astype(np.int64)
    assert stream[0] == EOT_TOKEN and stream.max() <= EOT_TOKEN
    assert len(np.unique(stream)) <= 64 + 1
    # learnable: inside documents every token has at most `branching` distinct successors
    a, b = stream[:-1], stream[1:]
    inside = (a != EOT_TOKEN) & (b != EOT_TOKEN)
    succ = {}
    for x, y in zip(a[inside], b[inside]):
        succ.setdefault(x, set()).add(y)
    assert max(len(s) for s in succ.values()) <= 3
    assert 10 < int((stream == EOT_TOKEN).sum()) < len(stream) / 64  # several docs, each >= 64 tokens


def test_synthetic_refuses_to_mix_and_reports_unwritable_dirs(tmp_path, capsys):
    synth = load_module("make_synthetic_shards")
    small = ["--shard_tokens", 100, "--val_tokens", 50]
    assert synth.main([str(a) for a in ["--out_dir", tmp_path / "d", "--train_shards", 2, *small]]) == 0
    assert synth.main([str(a) for a in ["--out_dir", tmp_path / "d", "--train_shards", 1, *small]]) == 2
    assert "already holds 3 fineweb_*.bin shards; use --overwrite" in capsys.readouterr().err
    assert synth.main([str(a) for a in ["--out_dir", tmp_path / "d", "--train_shards", 1, *small, "--overwrite"]]) == 0
    assert [f.name for f in shard_files(tmp_path / "d")] == ["fineweb_val_000000.bin", "fineweb_train_000001.bin"]
    (tmp_path / "a_file").write_text("")
    capsys.readouterr()
    assert synth.main(["--out_dir", str(tmp_path / "a_file" / "sub"), *map(str, small)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write shards to") and err.count("\n") == 1


# ----------------------------------------------------------------------------- shared: the format, no torch

def test_data_scripts_write_the_trainers_format_without_torch(tmp_path):
    code = ("import sys; sys.path.insert(0, 'data'); import tokenize_shards, make_synthetic_shards, python_corpus; "
            "assert 'torch' not in sys.modules and 'train_gpt' not in sys.modules, 'imported torch or train_gpt'; "
            "import numpy as np; tokenize_shards.write_shard(sys.argv[1], np.array([50256, 7, 65535], np.uint16)); "
            "print(tokenize_shards.SHARD_MAGIC, tokenize_shards.SHARD_VERSION, tokenize_shards.SHARD_HEADER_INTS, "
            "tokenize_shards.EOT_TOKEN)")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "s.bin")], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(SHARD_MAGIC), str(SHARD_VERSION), str(SHARD_HEADER_INTS), str(EOT_TOKEN)]
    assert read_shard(tmp_path / "s.bin").tolist() == [EOT_TOKEN, 7, 65535]  # train_gpt.py reads it


# ----------------------------------------------------------------------------- never destroy old shards

@pytest.fixture
def old_data(tmp_path):
    """A folder with a complete old dataset (val + 3 train shards) and a file that is not a shard."""
    d = tmp_path / "data"
    synth = load_module("make_synthetic_shards")
    assert synth.main([str(a) for a in ["--out_dir", d, "--train_shards", 3, "--shard_tokens", 100, "--val_tokens", 50,
                                        "--seed", 5]]) == 0
    (d / "notes.txt").write_text("not a shard: never touched\n")
    return d


def run_limited(script, *args, max_file_kb=None):
    """The script in a subprocess; with max_file_kb, every file it writes is capped (a full disk, for it)."""
    cmd = [sys.executable, str(DATA / script), *map(str, args)]
    if max_file_kb is not None:
        cmd = ["bash", "-c", f'ulimit -f {max_file_kb} && exec "$@"', "bash", *cmd]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)


def failing_run(case, tmp_path, out_dir, bpe_file, site_tree):
    """(script, args, file-size cap in KB, text of the expected error) of one way a run fails."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": broken\n')
    big = tmp_path / "big.txt"
    big.write_text(" ".join(f"word{i}" for i in range(20_000)))
    tok = ["--out_dir", out_dir, "--bpe_file", bpe_file, "--overwrite"]
    corpus = [*site_args(site_tree), "--out_dir", out_dir, "--bpe_file", bpe_file, "--workers", 2, "--overwrite"]
    return {
        "tokenize_missing_input": ("tokenize_shards.py", [tmp_path / "missing.jsonl", *tok], None,
                                   "does not exist; check the path"),
        "tokenize_bad_json_line_2": ("tokenize_shards.py", [bad, *tok], None, "bad.jsonl:2: invalid JSON"),
        "tokenize_disk_full": ("tokenize_shards.py", [big, *tok, "--workers", 2], 2, "File too large"),
        "synthetic_disk_full": ("make_synthetic_shards.py", ["--out_dir", out_dir, "--overwrite", "--shard_tokens", 100_000,
                                                             "--val_tokens", 50_000], 2, "File too large"),
        "corpus_missing_site_packages": ("python_corpus.py", [*corpus, "--site_packages", tmp_path / "nowhere"], None,
                                         "is not a folder; check the path"),
        "corpus_disk_full": ("python_corpus.py", corpus, 2, "File too large"),
    }[case]


@pytest.mark.parametrize("case", ["tokenize_missing_input", "tokenize_bad_json_line_2", "tokenize_disk_full",
                                  "synthetic_disk_full", "corpus_missing_site_packages", "corpus_disk_full"])
def test_failed_overwrite_keeps_old_shards(tmp_path, bpe_file, site_tree, old_data, case):
    script, args, max_file_kb, expect = failing_run(case, tmp_path, old_data, bpe_file, site_tree)
    before = digests(old_data)
    r = run_limited(script, *args, max_file_kb=max_file_kb)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert len(error_lines(r.stderr)) == 1 and last_line(r.stderr).startswith("error:")
    assert expect in last_line(r.stderr) and "; " in last_line(r.stderr)  # what; what to do
    assert digests(old_data) == before
    assert not leftovers(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_parent_keeps_old_shards(tmp_path, bpe_file, corpus, old_data):
    before = digests(old_data)
    os.chmod(tmp_path, 0o555)  # old_data itself stays writable: only the temporary folder cannot be made
    try:
        r = run_limited("tokenize_shards.py", *corpus[0], "--out_dir", old_data, "--bpe_file", bpe_file, "--overwrite")
    finally:
        os.chmod(tmp_path, 0o755)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "cannot create a temporary folder" in last_line(r.stderr) and "make" in last_line(r.stderr)
    assert digests(old_data) == before and not leftovers(tmp_path)


def test_unwritable_parent_keeps_old_shards(tmp_path, old_data, monkeypatch, capsys):
    """The read-only parent of the test above, for root too: the temporary folder cannot be made."""
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    before = digests(old_data)
    synth = load_module("make_synthetic_shards")
    assert synth.main(["--out_dir", str(old_data), "--overwrite"]) == 2
    assert error_lines(capsys.readouterr().err) == [
        f"error: cannot write shards to {old_data}: cannot create a temporary folder in {tmp_path} (Permission denied); "
        f"make {tmp_path} writable or choose another --out_dir"]
    assert digests(old_data) == before and not leftovers(tmp_path)


def test_interrupt_while_tokenizing_keeps_old_shards(tmp_path, bpe_file, corpus, old_data, monkeypatch, capsys):
    tok = load_module("tokenize_shards")
    staged, encoded = [], []
    real_write, real_encode = tok.write_shard, tok.encode_doc

    def encode_then_interrupt(text):
        encoded.append(text)
        if len(encoded) == 40:
            raise KeyboardInterrupt
        return real_encode(text)
    monkeypatch.setattr(tok, "write_shard", lambda path, toks: (staged.append(path), real_write(path, toks)))
    monkeypatch.setattr(tok, "encode_doc", encode_then_interrupt)
    before = digests(old_data)
    argv = [*corpus[0], "--out_dir", old_data, "--bpe_file", bpe_file, "--overwrite", "--val_tokens", 10, "--shard_size", 64]
    assert tok.main([str(a) for a in argv]) == 2
    assert len(staged) > 3  # new shards existed (in the temporary folder) when Ctrl-C came
    assert error_lines(capsys.readouterr().err) == [f"error: interrupted; {old_data} was left as it was, run the command again"]
    assert digests(old_data) == before and not leftovers(tmp_path)


def test_ctrl_c_with_workers_keeps_old_shards(tmp_path, bpe_file, old_data):
    big = tmp_path / "big.jsonl"
    big.write_text("".join(json.dumps({"text": f"document {i}: " + "some words to encode " * 20}) + "\n"
                           for i in range(100_000)))
    before = digests(old_data)
    proc = subprocess.Popen([sys.executable, str(DATA / "tokenize_shards.py"), big, "--out_dir", old_data, "--overwrite",
                             "--bpe_file", bpe_file, "--workers", "2", "--val_tokens", "1000", "--shard_size", "10000"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not list(tmp_path.glob("data.tmp-*/fineweb_train_*.bin")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)  # Ctrl-C once the new set is half written
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and "Traceback" not in err  # the workers leave Ctrl-C to the main process
    assert error_lines(err) == [f"error: interrupted; {old_data} was left as it was, run the command again"]
    assert digests(old_data) == before and not leftovers(tmp_path)


def failing_renames(monkeypatch, failing):
    """os.replace that raises EIO at the calls numbered in failing (1-based); returns the list of calls."""
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append((src, dst))
        if len(calls) in failing:
            raise OSError(5, "Input/output error")
        real_replace(src, dst)
    monkeypatch.setattr(os, "replace", replace)
    return calls


def overwrite_synthetic(old_data):
    """make_synthetic_shards --overwrite on old_data, in this process; its exit status."""
    return load_module("make_synthetic_shards").main(
        [str(a) for a in ["--out_dir", old_data, "--train_shards", 2, "--shard_tokens", 100, "--val_tokens", 50,
                          "--overwrite"]])


def test_failed_rename_puts_old_shards_back(tmp_path, old_data, monkeypatch, capsys):
    calls = failing_renames(monkeypatch, {6})  # after the 4 old shards were moved aside and 1 new one moved in
    before = digests(old_data)
    assert overwrite_synthetic(old_data) == 2
    assert error_lines(capsys.readouterr().err) == [f"error: cannot move the new shards into {old_data} "
                                                    "(Input/output error); check its permissions and free space, then run again"]
    assert len(calls) == 6 + 5  # the 5 done renames undone
    assert digests(old_data) == before and not leftovers(tmp_path)


def test_failed_undo_keeps_old_shards_in_the_temporary_folder(tmp_path, old_data, monkeypatch, capsys):
    failing_renames(monkeypatch, {6, 7})  # the sixth rename fails, and so does the first rename undoing it
    before = {n: h for n, h in digests(old_data).items() if n.endswith(".bin")}
    assert overwrite_synthetic(old_data) == 2
    (err,) = error_lines(capsys.readouterr().err)
    retired = next(tmp_path.glob("data.tmp-*/.retired"))
    assert err.endswith(f"nor the old ones back; move the files of {retired} back into {old_data} by hand")
    assert digests(retired) == before  # the old shards are kept, not deleted with the temporary folder


def test_overwrite_replaces_the_whole_set(tmp_path, bpe_file, corpus, site_tree, old_data, capsys):
    old = digests(old_data)
    fresh = tmp_path / "fresh"
    tok_args = ["--val_tokens", 64, "--shard_size", 10**6]
    tokenize(corpus[0], old_data, bpe_file, *tok_args, "--overwrite")
    tokenize(corpus[0], fresh / "tok", bpe_file, *tok_args)
    shards = {"fineweb_val_000000.bin", "fineweb_train_000001.bin"}
    assert set(digests(old_data)) == shards | {"notes.txt"}          # old train shards 2 and 3 are gone
    assert {n: h for n, h in digests(old_data).items() if n in shards} == digests(fresh / "tok")  # nothing old mixed in
    assert digests(old_data)["fineweb_val_000000.bin"] != old["fineweb_val_000000.bin"]

    pc = load_module("python_corpus")
    corpus_args = [*site_args(site_tree), "--bpe_file", bpe_file, "--workers", 1, "--shard_size", 10**6]
    assert pc.main([str(a) for a in [*corpus_args, "--out_dir", old_data, "--overwrite"]]) == 0
    assert pc.main([str(a) for a in [*corpus_args, "--out_dir", fresh / "pc"]]) == 0
    assert set(digests(old_data)) == shards | {"notes.txt", "fineweb_manifest.json"}
    assert {n: h for n, h in digests(old_data).items() if n in shards} == \
        {n: h for n, h in digests(fresh / "pc").items() if n in shards}

    synth = load_module("make_synthetic_shards")  # the corpus's manifest belongs to the replaced set
    assert synth.main([str(a) for a in ["--out_dir", old_data, "--train_shards", 2, "--shard_tokens", 100,
                                        "--val_tokens", 50, "--overwrite"]]) == 0
    assert set(digests(old_data)) == shards | {"notes.txt", "fineweb_train_000002.bin"}
    assert digests(old_data)["notes.txt"] == old["notes.txt"]
    assert not leftovers(tmp_path)


# ----------------------------------------------------------------------------- python_corpus.py

MARKS_OUTSIDE = ["NOPE_MARK", "ZETA_MARK", "PRIVATE_MARK", "DIGIT_MARK", "BIG_MARK", "CACHE_MARK", "TXT_MARK",
                 "SINGLE_MODULE_MARK", "DISTINFO_MARK", "SECOND_ALPHA_MARK", "LINKED_MARK"]


@pytest.fixture(scope="module")
def site_tree(tmp_path_factory):
    """Two fake site-packages folders; returns (folders, {relative path: text} of the documents a-m must give)."""
    root = tmp_path_factory.mktemp("site")
    site1, site2 = root / "site1", root / "site2"
    docs = {
        "alpha/__init__.py": "ALPHA = 'the alpha package'\n",
        "alpha/core.py": "def core(x):\n    return x + 1  # naïve ünïcode\n",
        "alpha/sub/deep.py": "class Deep:\n    depth = 3\n",
        "Beta/__init__.py": "BETA = 'upper-case first letter counts as b'\n",
        "kpkg/__init__.py": "K = 'from the second site-packages folder'\n",
    }
    for i in range(60):
        docs[f"mpkg/mod_{i:02d}.py"] = (f'"""Module {i} of mpkg."""\n\n\ndef value_{i}(x):\n'
                                        f'    return x * {i} + len("mpkg module number {i}")\n')
    files = {site1 / rel: text.encode() for rel, text in docs.items() if not rel.startswith("kpkg")}
    files[site1 / "Beta/__init__.py"] = b"\xef\xbb\xbf" + docs["Beta/__init__.py"].encode()  # a BOM: dropped
    files[site2 / "kpkg/__init__.py"] = docs["kpkg/__init__.py"].encode()
    files.update({
        site1 / "alpha/big.py": b"BIG_MARK = '" + b"x" * (256 * 1024) + b"'\n",  # over 256 KiB
        site1 / "alpha/__pycache__/cached.py": b"CACHE_MARK = 1\n",
        site1 / "alpha/data.txt": b"TXT_MARK\n",
        site1 / "mpkg/__init__.py": b"\n\n",                                      # empty
        site1 / "mpkg/latin1.py": b"# caf\xe9 = 'coffee'\n",                      # not UTF-8
        site1 / "nope/__init__.py": b"NOPE_MARK = 'n-z is kept out'\n",
        site1 / "nope/secret.py": b"LINKED_MARK = 'reached through a symlink'\n",
        site1 / "zeta/__init__.py": b"ZETA_MARK = 'z is kept out'\n",
        site1 / "_private/__init__.py": b"PRIVATE_MARK = 1\n",
        site1 / "9lives/__init__.py": b"DIGIT_MARK = 1\n",
        site1 / "cmod.py": b"SINGLE_MODULE_MARK = 1\n",
        site1 / "alpha-1.0.dist-info/RECORD": b"alpha/__init__.py,,\nalpha/core.py,,\nalpha-1.0.dist-info/RECORD,,\n",
        site1 / "alpha-1.0.dist-info/hook.py": b"DISTINFO_MARK = 1\n",
        site1 / "mpkg-2.5.dist-info/top_level.txt": b"mpkg\n",
        site2 / "alpha/__init__.py": b"SECOND_ALPHA_MARK = 'shadowed by site1/alpha'\n",
    })
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (site1 / "mpkg/link.py").symlink_to(site1 / "nope/secret.py")
    (site1 / "alpha/linked_dir").symlink_to(site1 / "zeta", target_is_directory=True)
    return [site1, site2], docs


def site_args(site_tree):
    return ["--site_packages", site_tree[0][0], "--site_packages", site_tree[0][1]]


def decoded_docs(paths, bpe):
    """The documents of shards read as one stream (a document may span two shards)."""
    stream = np.concatenate([read_shard(p) for p in paths])
    return [bpe.decode(d.tolist()) for d in split_docs(stream)]


def test_python_corpus_reads_only_the_chosen_packages(tmp_path, bpe, bpe_file, site_tree, monkeypatch, capsys):
    pc = load_module("python_corpus")
    opened = []
    monkeypatch.setattr(pc, "open", lambda path, *a, **kw: (opened.append(Path(path)), open(path, *a, **kw))[1],
                        raising=False)
    out = tmp_path / "pc"
    assert pc.main([str(a) for a in [*site_args(site_tree), "--out_dir", out, "--bpe_file", bpe_file,
                                     "--val_share", 0.1, "--workers", 1]]) == 0
    stdout = capsys.readouterr().out
    expected = site_tree[1]
    assert [f.name for f in shard_files(out)] == ["fineweb_val_000000.bin", "fineweb_train_000001.bin"]
    val, train = decoded_docs(shard_files(out)[:1], bpe), decoded_docs(shard_files(out)[1:], bpe)
    assert sorted(val + train) == sorted(expected.values())          # every a-m file once, nothing else
    assert len(val) == round(0.1 * len(expected))
    assert not [m for m in MARKS_OUTSIDE if any(m in d for d in val + train)]
    assert not [p for p in opened if {"nope", "zeta", "_private", "9lives"} & set(p.parts)]  # n-z never opened
    may_open = [*expected, "mpkg/__init__.py", "mpkg/latin1.py"]  # the last two are read, then skipped
    assert not [p for p in opened if p.suffix == ".py" and not any(str(p).endswith(rel) for rel in may_open)]

    manifest = json.loads((out / "fineweb_manifest.json").read_text())
    assert manifest["packages"] == [{"name": "Beta", "version": None, "documents": 1},
                                    {"name": "alpha", "version": "1.0", "documents": 3},
                                    {"name": "kpkg", "version": None, "documents": 1},
                                    {"name": "mpkg", "version": "2.5", "documents": 60}]
    assert manifest["documents"] == {"val": len(val), "train": len(train)}
    assert manifest["skipped"] == {"too_big": ["alpha/big.py"], "undecodable": ["mpkg/latin1.py"],
                                   "empty": ["mpkg/__init__.py"], "unreadable": []}
    counts = [len(read_shard(f)) for f in shard_files(out)]
    assert manifest["tokens"] == {"val": counts[0], "train": counts[1]}
    assert manifest["shards"] == [{"file": f.name, "tokens": n} for f, n in zip(shard_files(out), counts)]
    assert manifest["seed"] == 1234 and manifest["letters"] == "abcdefghijklm" and manifest["args"]["val_share"] == 0.1
    assert "packages: 4 (Beta, alpha, kpkg, mpkg)" in stdout and f"documents: {len(expected)} (val {len(val)}," in stdout
    assert "files skipped: 1 over 262,144 bytes, 1 not UTF-8, 1 empty, 0 unreadable" in stdout


def test_python_corpus_same_seed_same_bytes_other_seed_other_order(tmp_path, bpe, bpe_file, site_tree):
    def build(name, *extra):
        r = run_script("python_corpus.py", *site_args(site_tree), "--out_dir", tmp_path / name, "--bpe_file", bpe_file,
                       "--val_share", 0.1, "--shard_size", 300, *extra)  # the real CLI
        assert r.returncode == 0, r.stderr
        return shard_files(tmp_path / name)
    a, b, c = build("a", "--workers", 2), build("b", "--workers", 1), build("c", "--workers", 2, "--seed", 7)
    assert len(a) > 3 and [f.read_bytes() for f in a] == [f.read_bytes() for f in b]
    docs_a = decoded_docs(a[:1], bpe) + decoded_docs(a[1:], bpe)
    docs_c = decoded_docs(c[:1], bpe) + decoded_docs(c[1:], bpe)
    assert sorted(docs_a) == sorted(docs_c) and docs_a != docs_c
    assert a[0].read_bytes() != c[0].read_bytes()  # another val sample


def test_python_corpus_n_to_z_and_refusal(tmp_path, bpe, bpe_file, site_tree, capsys):
    pc = load_module("python_corpus")
    argv = [*site_args(site_tree), "--out_dir", tmp_path / "nz", "--bpe_file", bpe_file, "--letters", "n-z", "--workers", 1]
    assert pc.main([str(a) for a in argv]) == 0
    docs = decoded_docs(shard_files(tmp_path / "nz")[:1], bpe) + decoded_docs(shard_files(tmp_path / "nz")[1:], bpe)
    assert sorted(docs) == ["LINKED_MARK = 'reached through a symlink'\n", "NOPE_MARK = 'n-z is kept out'\n",
                            "ZETA_MARK = 'z is kept out'\n"]  # nope/secret.py is read here, as nope's own file
    capsys.readouterr()
    assert pc.main([str(a) for a in argv]) == 2  # without --overwrite an existing set is refused
    assert "already holds 2 fineweb_*.bin shards; use --overwrite" in last_line(capsys.readouterr().err)


@pytest.mark.parametrize("spec, letters", [("a-m", "abcdefghijklm"), ("N-Z", "nopqrstuvwxyz"), ("a-c,x", "abcx"),
                                           ("mq", "mq"), ("m-a", None), ("a-", None), ("_", None)])
def test_python_corpus_letters(spec, letters):
    got = load_module("python_corpus").parse_letters(spec)
    assert ("".join(sorted(got)) if got is not None else None) == letters


# ----------------------------------------------------------------------------- cached_fineweb10B.py

def fake_hub(monkeypatch, on_call):
    calls = []

    def hf_hub_download(**kw):
        calls.append(kw)
        return on_call(**kw)

    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(hf_hub_download=hf_hub_download))
    return calls


def fake_download(repo_id, filename, repo_type, local_dir, **kw):
    path = Path(local_dir) / filename
    write_shard(path, np.arange(10, dtype=np.uint16))
    return str(path)


def test_cached_skips_present_valid_shards(tmp_path, monkeypatch, capsys):
    cached = load_module("cached_fineweb10B")
    for name in ["fineweb_val_000000.bin", "fineweb_train_000001.bin"]:
        write_shard(tmp_path / name, np.arange(100, dtype=np.uint16))
    calls = fake_hub(monkeypatch, lambda **kw: pytest.fail("must not download"))
    assert cached.main(["1", "--out_dir", str(tmp_path)]) == 0
    assert calls == []
    assert "0 downloaded, 2 already present" in capsys.readouterr().out


def test_cached_downloads_missing_and_invalid(tmp_path, monkeypatch):
    cached = load_module("cached_fineweb10B")
    write_shard(tmp_path / "finewebedu_val_000000.bin", np.arange(100, dtype=np.uint16))  # valid: kept
    (tmp_path / "finewebedu_train_000001.bin").write_bytes(b"garbage")                   # invalid: refetched
    calls = fake_hub(monkeypatch, fake_download)
    assert cached.main(["2", "--variant", "edu10B", "--out_dir", str(tmp_path)]) == 0
    assert [c["filename"] for c in calls] == ["finewebedu_train_000001.bin", "finewebedu_train_000002.bin"]
    assert all(c["repo_id"] == "kjj0/finewebedu10B-gpt2" and c["repo_type"] == "dataset" for c in calls)
    assert calls[0]["force_download"] is True and calls[1]["force_download"] is False
    assert len(read_shard(tmp_path / "finewebedu_train_000001.bin")) == 10


def test_cached_no_network_exits_2(tmp_path, monkeypatch, capsys):
    cached = load_module("cached_fineweb10B")

    def offline(**kw):
        raise ConnectionError("Failed to resolve 'huggingface.co'\n(second line of detail)")
    fake_hub(monkeypatch, offline)
    assert cached.main(["1", "--out_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: could not download fineweb_val_000000.bin")
    assert "no network?" in err and str(tmp_path) in err
    assert not list(tmp_path.glob("*.bin"))


def test_cached_without_huggingface_hub_exits_2(tmp_path, monkeypatch, capsys):
    cached = load_module("cached_fineweb10B")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import raises ImportError
    assert cached.main(["1", "--out_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install huggingface_hub" in err
