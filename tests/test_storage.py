"""Storage faults end cleanly: a full disk (ENOSPC) or a file-size limit (EFBIG) while
writing a checkpoint, ``metrics.jsonl`` or a report ends the command in one line naming the
path and the errno; the records already written stay whole (every line parses), the previous
checkpoint stays valid, and ``--resume auto`` continues once there is room again.

Full disks are small tmpfs mounts (root only: skipped with the reason otherwise, always
unmounted); file-size limits are ``RLIMIT_FSIZE`` with SIGXFSZ ignored (so a write fails
with EFBIG instead of killing the process), which works everywhere: in this process for the
writers, and in a real run through the ``preexec_fn`` of ``accord train``, whose workers
inherit both.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_input_holes import report_args
from test_report import write_run

import accord
from accord import checkpoint, report
from accord.run import train
from accord.run.config import TrainConfig
from accord.run.failures import StorageError, storage_error
from accord.run.launch import finish_summary
from accord.run.metrics import MetricsWriter, append_record
from accord.run.validation import validate

SRC = Path(__file__).resolve().parents[1] / "src"
RUN_LIMIT = 240.0  # seconds any one run may take


@contextlib.contextmanager
def file_size_limit(nbytes: int):
    """RLIMIT_FSIZE of ``nbytes`` in this process, SIGXFSZ ignored; both restored. Keep the
    block small: every file this process extends past the limit fails meanwhile."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def _limited(nbytes: int):
    """A preexec_fn: the child (and the workers it starts) get the file-size limit."""
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE,
                           (nbytes, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    return apply


def accord_train(out: Path, *args: str, limit: int | None = None
                 ) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(SRC))
    return subprocess.run(
        [sys.executable, "-m", "accord", "train", "--algo", "allreduce", "--workers", "2",
         "--out", str(out), "--no-progress", *args],
        env=env, capture_output=True, text=True, timeout=RUN_LIMIT,
        preexec_fn=None if limit is None else _limited(limit))


def lines(path: Path) -> list[dict]:
    """Every line of ``path`` as JSON: raises on a torn or partial line."""
    text = path.read_text()
    assert text.endswith("\n"), "the last record is cut"
    return [json.loads(line) for line in text.splitlines()]


@pytest.fixture
def tmpfs(tmp_path):
    """``tmpfs(size)``: a fresh tmpfs of that size (e.g. "160k"), unmounted afterwards."""
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        if os.geteuid() != 0:
            pytest.skip("a small tmpfs (a full disk) needs root to mount")
        where = tmp_path / f"tmpfs{len(mounted)}"
        where.mkdir()
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                              str(where)], capture_output=True, text=True)
        if res.returncode != 0:
            pytest.skip(f"mount -t tmpfs failed: {res.stderr.strip()}")
        mounted.append(where)
        return where

    try:
        yield mount
    finally:
        for where in mounted:
            if subprocess.run(["umount", str(where)], capture_output=True).returncode:
                subprocess.run(["umount", "-l", str(where)], capture_output=True)


def remount(where: Path, size: str) -> None:
    """Free space: the same tmpfs, larger (its files stay)."""
    subprocess.run(["mount", "-o", f"remount,size={size}", str(where)], check=True)


# -- the writers, in this process (everywhere) ----------------------------------------------

def test_a_metrics_record_is_whole_or_absent(tmp_path):
    path = tmp_path / "metrics.jsonl"
    writer = MetricsWriter(path)
    record = {"type": "step", "step": 0, "pad": "x" * 100}
    with file_size_limit(1000), pytest.raises(StorageError) as err:
        for step in range(100):
            writer.write({**record, "step": step})
    assert str(err.value) == f"cannot write {path}: EFBIG (File too large)"
    assert err.value.errno == 27 and isinstance(err.value, OSError)
    kept = lines(path)  # the refused record was cut: every line parses
    assert [r["step"] for r in kept] == list(range(len(kept))) and len(kept) == step
    assert path.stat().st_size == writer.size <= 1000
    writer.write({**record, "step": step})  # room again: the file continues cleanly
    writer.close()
    assert [r["step"] for r in lines(path)] == list(range(step + 1))


def test_append_record_ends_a_torn_line_first(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"type": "header"}\n{"type": "step", "st')  # a writer killed mid-line
    append_record(path, {"type": "summary", "status": "failed"})
    assert path.read_text().splitlines()[-1] == '{"type": "summary", "status": "failed"}'


def _metrics(path: Path, steps: int) -> list[dict]:
    """A metrics.jsonl of a header and ``steps - 1`` step records of about 360 bytes."""
    records = [{"type": "header", "config": {}},
               *({"type": "step", "step": s, "eval_loss": 1.0 / s, "algo": {"note": "x" * 300}}
                 for s in range(1, steps))]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


FAILURE = {"failed_rank": 0, "error": "StorageError: cannot write x: ENOSPC (No space left "
           "on device)", "failed_step": 39}


def test_the_launchers_summary_that_does_not_fit_says_why(tmp_path):
    path = tmp_path / "metrics.jsonl"
    before = _metrics(path, 40)
    with file_size_limit(path.stat().st_size + 10):  # not even one more line
        reason = finish_summary(path, "failed", FAILURE)
    assert reason == f"cannot write {path}: EFBIG (File too large)"
    assert lines(path) == before  # the records as they were, no temporary file left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_the_launchers_summary_is_appended_when_a_new_copy_does_not_fit(tmpfs):
    disk = tmpfs("16k")  # 4 pages: a 9 KB file (3 pages) has no room for a copy
    path = disk / "metrics.jsonl"
    before = _metrics(path, 24)
    assert 8192 < path.stat().st_size < 12288 - 300
    assert finish_summary(path, "failed", FAILURE) is None
    after = lines(path)
    assert after[:-1] == before
    assert after[-1] == {"type": "summary", "status": "failed", "eval_loss": 1 / 23, **FAILURE}
    # a summary rank 0 wrote itself stays when it cannot be replaced
    assert finish_summary(path, "interrupted", {"error": "interrupted"}) is None
    assert lines(path) == after
    assert sorted(p.name for p in disk.iterdir()) == ["metrics.jsonl"]


def test_a_report_that_does_not_fit_is_one_line_and_the_old_one_stays(tmp_path, capsys):
    runs, out = tmp_path / "runs", tmp_path / "report"
    write_run(runs, "allreduce/seed0", algo="allreduce", seed=0)
    argv = report_args([str(runs), "--out", str(out)])
    assert report.run(argv) == 0

    def files() -> dict[str, bytes]:
        return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    before = files()
    assert {"report.md", "points.csv", "figures/digits_w2_step.png"} <= set(before)
    capsys.readouterr()
    with file_size_limit(300):  # the first figure is larger
        code = report.run(argv)
    err = capsys.readouterr().err
    assert code == 1
    assert err == (f"accord report: error: cannot write {out / 'figures' / 'digits_w2_step.png'}"
                   ": EFBIG (File too large)\n")
    assert files() == before  # every earlier file whole, no temporary file left
    with file_size_limit(300):  # without figures: the CSV files are written first
        with pytest.raises(StorageError, match=f"cannot write {out / 'points.csv'}: EFBIG"):
            report.write_report(runs, out, figures=False, warn=lambda m: None)
    assert files() == before


def test_a_checkpoint_that_does_not_fit_leaves_the_previous_one(tmp_path, world_of_one):
    cfg = TrainConfig(algo="allreduce", workers=1, steps=10, out=str(tmp_path))
    validate(cfg, check_out=False)
    model = torch.nn.Linear(64, 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    agg = accord.build("allreduce", model.parameters())
    train._checkpoint(cfg, 5, model, optimizer, agg, None, None, {})
    previous = tmp_path / "checkpoints" / "step-5"
    with file_size_limit(4000), pytest.raises(StorageError) as err:  # the file is ~5 KB
        train._checkpoint(cfg, 10, model, optimizer, agg, None, None, {})
    assert str(err.value) == \
        f"cannot write {tmp_path / 'checkpoints' / 'step-10'}: EFBIG (File too large)"
    assert list((tmp_path / "checkpoints" / "step-10").iterdir()) == []  # no partial file
    assert checkpoint.find(tmp_path / "checkpoints", 1, cfg.fingerprint())[0] == previous
    checkpoint.verify(previous, 1, cfg.fingerprint())
    agg.close()


def test_torchs_own_write_error_is_traced_to_its_errno(tmp_path):
    """torch.save raises a RuntimeError ("unexpected pos") whose context is the OSError."""
    with file_size_limit(1000), pytest.raises(RuntimeError) as err, \
            open(tmp_path / "x.pt", "wb") as f:
        torch.save(torch.zeros(10000), f)
    error = storage_error(err.value, tmp_path / "x.pt")
    assert str(error) == f"cannot write {tmp_path / 'x.pt'}: EFBIG (File too large)"
    assert storage_error(RuntimeError("no OSError behind it"), tmp_path) is None


# -- real runs --------------------------------------------------------------------------------

def test_a_full_disk_at_a_checkpoint_ends_in_one_line_and_resumes(tmpfs):
    disk = tmpfs("160k")  # the first checkpoint (2 x 54 KB) fits, the second does not
    out = disk / "run"
    res = accord_train(out, "--steps", "20", "--checkpoint-every", "5")
    assert res.returncode == 1, res.stderr
    [line] = res.stderr.strip().splitlines()
    assert line.startswith("accord train: error: worker rank ")
    assert f"failed at step 9: StorageError: cannot write {out / 'checkpoints' / 'step-10'}: " \
           "ENOSPC (No space left on device)" in line
    records = lines(out / "metrics.jsonl")
    assert records[-1]["status"] == "failed" and "ENOSPC" in records[-1]["error"]
    assert [r["step"] for r in records if r["type"] == "checkpoint"] == [5]
    checkpoint.verify(out / "checkpoints" / "step-5")  # the previous checkpoint is whole
    assert not list((out / "checkpoints" / "step-10").glob("*.tmp"))
    remount(disk, "4m")  # space freed
    res = accord_train(out, "--steps", "20", "--checkpoint-every", "5", "--resume", "auto")
    assert res.returncode == 0, res.stderr
    assert f"resuming from {out / 'checkpoints' / 'step-5'}" in res.stderr
    records = lines(out / "metrics.jsonl")
    assert [r["step"] for r in records if r["type"] == "step"] == [10, 20]
    assert records[-1]["status"] == "ok" and records[-1]["steps"] == 20


def test_a_full_disk_under_metrics_jsonl_keeps_every_record_whole(tmpfs, tmp_path):
    disk = tmpfs("32k")
    out = disk / "run"
    res = accord_train(out, "--steps", "200", "--log-every", "1")
    assert res.returncode == 1, res.stderr
    [line] = res.stderr.strip().splitlines()
    path = out / "metrics.jsonl"
    assert f"StorageError: cannot write {path}: ENOSPC (No space left on device)" in line
    records = lines(path)  # every record whole
    steps = [r["step"] for r in records if r["type"] == "step"]
    assert steps == list(range(1, len(steps) + 1)) and 10 < len(steps) < 200
    if records[-1]["type"] == "summary":  # where there was room for it
        assert records[-1]["status"] == "failed" and "ENOSPC" in records[-1]["error"]
    else:  # metrics.jsonl is on the full disk: the one line says so
        assert line.endswith(f"(no summary: cannot write {path}: ENOSPC (No space left on "
                             "device))")
    # the run is read as it is
    report.write_report(disk, tmp_path / "report", figures=False, warn=lambda m: None)


def test_a_file_size_limit_ends_in_one_line_and_resumes_everywhere(tmp_path):
    """EFBIG from RLIMIT_FSIZE (no root needed): metrics.jsonl reaches the limit; the run
    resumes from step 0 without it, keeping the earlier attempt's records."""
    out = tmp_path / "run"
    res = accord_train(out, "--steps", "40", "--log-every", "1", limit=8000)
    assert res.returncode == 1, res.stderr
    [line] = res.stderr.strip().splitlines()
    path = out / "metrics.jsonl"
    assert f"StorageError: cannot write {path}: EFBIG (File too large)" in line
    first = lines(path)
    assert path.stat().st_size <= 8000
    steps = [r["step"] for r in first if r["type"] == "step"]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) < 40
    res = accord_train(out, "--steps", "40", "--log-every", "10", "--resume", "auto")
    assert res.returncode == 0, res.stderr
    records = lines(path)
    assert records[0] == first[0]  # the same run: its header kept
    assert [r["step"] for r in records if r["type"] == "step"] == [10, 20, 30, 40]
    assert records[-1]["status"] == "ok"
