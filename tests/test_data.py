"""Shard format, loader order across ranks, validation data, and each bad-shard error."""
import numpy as np
import pytest
import torch

from conftest import run_trainer, tiny_flags
import train_gpt as tg


def test_shard_round_trip(tmp_path):
    tokens = np.arange(1000) % 50257
    tg.write_shard(tmp_path / "a.bin", tokens)
    header = np.fromfile(tmp_path / "a.bin", dtype=np.int32, count=256)
    assert list(header[:3]) == [20240520, 1, 1000]
    assert np.array_equal(tg.read_shard(tmp_path / "a.bin"), tokens)
    assert not (tmp_path / "a.bin.tmp").exists()


def corrupt(path, how):
    data = bytearray(path.read_bytes())
    if how == "magic":
        data[0:4] = np.int32(12345).tobytes()
    elif how == "version":
        data[4:8] = np.int32(7).tobytes()
    elif how == "size":
        data = data[:-10]
    elif how == "appended":
        data += b"\0" * 10
    elif how == "header":
        data = data[:100]
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how,message", [("magic", "bad magic 12345"), ("version", "unsupported version 7"),
                                         ("size", "truncated or corrupt"), ("appended", "truncated or corrupt"),
                                         ("header", "shorter than")])
def test_bad_shard_errors_name_the_file(tmp_path, how, message):
    path = tmp_path / "fineweb_train_000001.bin"
    tg.write_shard(path, np.arange(100))
    corrupt(path, how)
    with pytest.raises(tg.DataError) as err:
        tg.read_shard(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_token_ids_must_fit_uint16(tmp_path):
    with pytest.raises(tg.DataError, match="uint16"):
        tg.write_shard(tmp_path / "x.bin", [1, 70000])


def test_missing_empty_and_incomplete_data_dirs(tmp_path):
    with pytest.raises(tg.DataError, match="does not exist"):
        tg.find_shards(tmp_path / "nope")
    with pytest.raises(tg.DataError, match="needs a \\*_val_\\*.bin"):
        tg.find_shards(tmp_path)
    tg.write_shard(tmp_path / "fineweb_val_000000.bin", np.arange(10))
    tg.write_shard(tmp_path / "fineweb_train_000001.bin", [])
    with pytest.raises(tg.DataError, match="empty shard"):
        tg.find_shards(tmp_path)


def test_train_shards_are_taken_in_name_order(tmp_path):
    for name in ("fineweb_train_000002.bin", "fineweb_val_000000.bin", "fineweb_train_000010.bin",
                 "fineweb_train_000001.bin"):  # created out of order
        tg.write_shard(tmp_path / name, np.arange(10))
    val, train = tg.find_shards(tmp_path)
    assert val.name == "fineweb_val_000000.bin"
    assert [p.name for p in train] == ["fineweb_train_000001.bin", "fineweb_train_000002.bin",
                                       "fineweb_train_000010.bin"]


@pytest.mark.parametrize("how", ["magic", "size", "missing_dir"])
def test_bad_data_exits_2_before_training(tmp_path, tiny_data, how):
    import shutil
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    if how == "missing_dir":
        shutil.rmtree(data)
    else:
        corrupt(data / "fineweb_train_000002.bin", how)
    proc = run_trainer(tiny_flags(data, tmp_path / "logs"), check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert not (tmp_path / "logs").exists()  # nothing written before validation passes


def test_token_ids_above_vocab_exit_2_before_training(tmp_path, tiny_data):
    proc = run_trainer(tiny_flags(tiny_data, tmp_path / "logs", vocab_size=100), check=False)  # ids reach 255
    assert proc.returncode == 2 and "holds token id 255, but --vocab_size is 100" in proc.stderr, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and not (tmp_path / "logs").exists()


def test_loader_checks_token_ids_of_each_shard_it_opens(tmp_path):
    shards = make_shards(tmp_path, [40, 40])  # ids 0..79
    loader = tg.TrainLoader(shards, batch_size=2, seq_len=16, rank=0, world_size=1, vocab_size=60)
    loader.next_batch(2, "cpu")  # shard 1 (ids < 40) is fine
    with pytest.raises(tg.DataError, match="fineweb_train_000002.bin: holds token id 79"):
        loader.next_batch(2, "cpu")


def make_shards(tmp_path, sizes):
    paths = []
    start = 0
    for i, n in enumerate(sizes):
        paths.append(tmp_path / f"fineweb_train_{i + 1:06d}.bin")
        tg.write_shard(paths[-1], np.arange(start, start + n) % 60000)
        start += n
    return paths


def test_loader_ranks_split_one_global_batch(tmp_path):
    shards = make_shards(tmp_path, [200, 200])
    single = tg.TrainLoader(shards, batch_size=4, seq_len=8, rank=0, world_size=1)
    ranks = [tg.TrainLoader(shards, batch_size=4, seq_len=8, rank=r, world_size=2) for r in range(2)]
    for _ in range(5):
        whole = single.next_batch(2, "cpu")
        parts = [b for loader in ranks for b in loader.next_batch(2, "cpu")]
        assert len(whole) == len(parts)
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(whole, parts))
    x, y = whole[0]
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one


def test_loader_advances_shards_in_order_and_warns_on_wrap(tmp_path):
    shards = make_shards(tmp_path, [70, 40])  # 2 windows of 33 tokens in shard 1, 1 in shard 2
    warnings = []
    loader = tg.TrainLoader(shards, batch_size=2, seq_len=16, rank=0, world_size=1, warn=warnings.append)
    firsts = [int(loader.next_batch(2, "cpu")[0][0][0, 0]) for _ in range(4)]
    assert firsts == [0, 32, 70, 0]
    assert len(warnings) == 1 and "wrapping around" in warnings[0]
    assert loader.state() == dict(shard_index=0, pos=32, epoch=1)


def test_loader_state_round_trip(tmp_path):
    shards = make_shards(tmp_path, [100, 100])
    a = tg.TrainLoader(shards, batch_size=2, seq_len=8, rank=0, world_size=1)
    for _ in range(7):
        a.next_batch(1, "cpu")
    b = tg.TrainLoader(shards, batch_size=2, seq_len=8, rank=0, world_size=1)
    b.load_state(a.state())
    assert torch.equal(a.next_batch(2, "cpu")[0][0], b.next_batch(2, "cpu")[0][0])


def window_starts(loader, n):
    """First token of each of the next n global batches (make_shards writes consecutive ids across shards)."""
    return [int(loader.next_batch(loader.B, "cpu")[0][0][0, 0]) for _ in range(n)]


def test_data_seed_permutes_windows_and_shards_resumably(tmp_path):
    shards = make_shards(tmp_path, [170, 170, 170])  # 5 windows of 33 tokens in each shard
    plain = window_starts(tg.TrainLoader(shards, batch_size=2, seq_len=16, rank=0, world_size=1), 15)
    assert plain == [o + 32 * k for o in (0, 170, 340) for k in range(5)]  # --data_seed unset: the paper's order
    seeded = [window_starts(tg.TrainLoader(shards, batch_size=2, seq_len=16, rank=0, world_size=1, data_seed=s), 15)
              for s in (0, 0, 1)]
    assert seeded[0] == seeded[1] != plain and seeded[0] != seeded[2]  # deterministic per seed, differs across
    assert sorted(seeded[0]) == sorted(plain) == sorted(seeded[2])  # each window once per epoch
    a = tg.TrainLoader(shards, batch_size=2, seq_len=16, rank=0, world_size=1, data_seed=3)
    window_starts(a, 7)
    b = tg.TrainLoader(shards, batch_size=2, seq_len=16, rank=0, world_size=1, data_seed=3)
    b.load_state(a.state())
    assert window_starts(a, 12) == window_starts(b, 12)  # resumes mid-shard and across the epoch boundary
    ranks = [tg.TrainLoader(shards, batch_size=2, seq_len=16, rank=r, world_size=2, data_seed=5) for r in range(2)]
    whole = tg.TrainLoader(shards, batch_size=2, seq_len=16, rank=0, world_size=1, data_seed=5)
    for _ in range(6):  # ranks still split one global batch
        parts = [x for loader in ranks for x, _ in loader.next_batch(1, "cpu")]
        assert torch.equal(torch.cat(parts), whole.next_batch(2, "cpu")[0][0])


def test_validation_tokens_fixed_and_split_across_ranks(tmp_path):
    tg.write_shard(tmp_path / "val.bin", np.arange(1000))
    first = tg.val_batches(tmp_path / "val.bin", 96, 16, 2, rank=0, world_size=1, device="cpu")
    again = tg.val_batches(tmp_path / "val.bin", 96, 16, 2, rank=0, world_size=1, device="cpu")
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again))
    whole = torch.cat([x for x, _ in first])
    assert whole.shape == (6, 16) and int(whole[0, 0]) == 0 and int(whole[-1, -1]) == 95
    parts = [torch.cat([x for x, _ in tg.val_batches(tmp_path / "val.bin", 96, 16, 2, rank=r, world_size=3,
                                                     device="cpu")]) for r in range(3)]
    assert torch.equal(torch.cat(parts), whole)


def test_check_data_warns_or_refuses(tmp_path):
    tg.write_shard(tmp_path / "fineweb_val_000000.bin", np.arange(600))
    make_shards(tmp_path, [300])
    args = tg.resolve_config(["--device", "cpu", "--batch_size", "4", "--device_batch_size", "4",
                              "--sequence_length", "16", "--val_tokens", "512", "--num_iterations", "10"])
    val, train = tg.find_shards(tmp_path)
    warnings = []
    tg.check_data(val, train, args, warnings.append)  # 4 steps of 64 tokens in 300: wraps
    assert len(warnings) == 1 and "holds 4 steps" in warnings[0]
    args.val_tokens = 1024
    with pytest.raises(tg.DataError, match="lower --val_tokens"):
        tg.check_data(val, train, args, warnings.append)
    args.val_tokens, args.batch_size, args.device_batch_size = 512, 32, 32
    with pytest.raises(tg.DataError, match="no train shard holds one global batch"):
        tg.check_data(val, train, args, warnings.append)
