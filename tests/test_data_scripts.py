"""Tests of the data scripts: data/tokenize_shards.py, data/make_synthetic_shards.py, data/cached_fineweb10B.py.

CPU only, no network: tokenization uses the offline GPT-2 ranks in ../shared/tokenizer when that
checkout is present, else a stand-in ranks file of GPT-2's size (every byte, then byte pairs), so
these tests run on a clean clone too. The Hugging Face download is replaced by a fake
`huggingface_hub` module.
"""

import base64
import gzip
import importlib.util
import json
import subprocess
import sys
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


def test_tokenize_error_after_some_shards_removes_them(tmp_path, bpe_file):
    good, bad = tmp_path / "a_good.jsonl", tmp_path / "z_bad.jsonl"
    good.write_text("".join(json.dumps({"text": f"document number {i} of the good file."}) + "\n" for i in range(1100)))
    bad.write_text('{"text": broken\n')
    out = tmp_path / "out"
    r = run_script("tokenize_shards.py", good, bad, "--out_dir", out, "--bpe_file", bpe_file, "--val_tokens", 64,
                   "--shard_size", 128)  # the first 1024 documents are written before the bad file is read
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "z_bad.jsonl:1: invalid JSON" in last_line(r.stderr) and "shards written before it" in last_line(r.stderr)
    assert not list(out.glob("*"))


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
