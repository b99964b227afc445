"""Byte-level text corpora, split into training and validation files, and reproducible batches.

The default corpus is the source of the running interpreter's standard library: every ``*.py``
file under ``sysconfig.get_paths()["stdlib"]``, skipping ``site-packages`` (third-party code)
and the test suites (``test``, ``tests``, ``idle_test``), in sorted relative-path order. Text is
read as raw bytes, so the vocabulary is the 256 byte values and nothing needs a tokenizer.

A file belongs to the validation split when the first 8 bytes of the SHA-256 of its relative
path, read as an integer, fall below ``val_fraction * 2**64``: the split depends only on the
file name, so adding or editing one file moves no other file between splits. The corpus
checksum is the SHA-256 over every (relative path, contents) pair in order; together with the
Python version it identifies the data of a run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import sysconfig
from pathlib import Path

import numpy as np

VOCAB = 256
MIN_SPLIT_BYTES = 4096
SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})
TEXT_SUFFIXES = frozenset(
    {
        ".py",
        ".txt",
        ".md",
        ".rst",
        ".c",
        ".h",
        ".json",
        ".toml",
        ".cfg",
        ".ini",
        ".html",
        ".css",
        ".js",
        ".tex",
        ".csv",
        ".yaml",
        ".yml",
        ".sh",
        ".pyi",
    }
)


class DataError(ValueError):
    """A corpus that cannot be read or is too small to train on."""


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Training and validation bytes (uint8 arrays) and where they came from."""

    name: str
    root: str
    train: np.ndarray
    val: np.ndarray
    n_files: int
    n_val_files: int
    sha256: str
    split: str = "file-name hash"

    def describe(self) -> dict:
        return {
            "name": self.name,
            "root": self.root,
            "files": self.n_files,
            "val_files": self.n_val_files,
            "split": self.split,
            "train_bytes": int(self.train.size),
            "val_bytes": int(self.val.size),
            "sha256": self.sha256,
        }


def stdlib_files() -> tuple[Path, list[Path]]:
    """The standard library's ``*.py`` files (sorted, tests and site-packages left out)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return root, _walk(root, lambda p: p.suffix == ".py")


def _walk(root: Path, keep) -> list[Path]:
    found = []
    for current, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
        found.extend(Path(current, f) for f in files if keep(Path(f)))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _is_val(relative: str, val_fraction: float) -> bool:
    head = int.from_bytes(hashlib.sha256(relative.encode()).digest()[:8], "big")
    return head < val_fraction * 2**64


def load(path: str | os.PathLike | None = None, val_fraction: float = 0.1) -> Corpus:
    """Read a corpus: the standard library (``path`` None), a text file, or a directory.

    A directory contributes its text files (suffixes in ``TEXT_SUFFIXES``) and is split by
    file-name hash like the standard library, unless that leaves a split under 4096 bytes (too
    few files): then, like a single file, it is split by position, the last ``val_fraction``
    of its bytes being the validation set.

    Raises:
      DataError: the path does not exist, cannot be read, holds no text files, or one split
        is smaller than 4096 bytes.
    """
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction={val_fraction!r}, but expected a float in (0, 1)")
    if path is None:
        root, files = stdlib_files()
        name = "python-stdlib"
    else:
        root = Path(path).expanduser().resolve()
        name = str(root)
        if not root.exists():
            raise DataError(f"--data {str(path)!r}: no such file or directory")
        if root.is_file():
            return _single_file(root, val_fraction)
        if not root.is_dir():
            raise DataError(f"--data {str(path)!r}: neither a regular file nor a directory")
        files = _walk(root, lambda p: p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise DataError(
                f"--data {str(path)!r}: the directory holds no text files (expected suffixes {sorted(TEXT_SUFFIXES)})"
            )
    digest = hashlib.sha256()
    train, val, n_val = [], [], 0
    for file in files:
        relative = file.relative_to(root).as_posix()
        data = _read(file)
        digest.update(relative.encode() + b"\0" + len(data).to_bytes(8, "big") + data)
        if _is_val(relative, val_fraction):
            val.append(data)
            n_val += 1
        else:
            train.append(data)
    corpus = Corpus(name, str(root), _join(train), _join(val), len(files), n_val, digest.hexdigest())
    if min(corpus.train.size, corpus.val.size) < MIN_SPLIT_BYTES:
        # Too few files for a split by name (e.g. a handful of books): split the concatenation by
        # position instead, its last val_fraction of bytes being the validation set.
        whole = _join([_read(file) for file in files])
        cut = whole.size - int(whole.size * val_fraction)
        corpus = dataclasses.replace(
            corpus, train=whole[:cut].copy(), val=whole[cut:].copy(), n_val_files=0, split="position"
        )
    return _checked(corpus)


def _read(file: Path) -> bytes:
    try:
        return file.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read {str(file)!r}: {err.strerror or err}") from None


def _join(parts: list[bytes]) -> np.ndarray:
    return np.frombuffer(b"".join(parts), dtype=np.uint8).copy()


def _single_file(file: Path, val_fraction: float) -> Corpus:
    data = _read(file)
    cut = len(data) - int(len(data) * val_fraction)
    array = np.frombuffer(data, dtype=np.uint8)
    corpus = Corpus(
        str(file),
        str(file),
        array[:cut].copy(),
        array[cut:].copy(),
        1,
        0,
        hashlib.sha256(data).hexdigest(),
        split="position",
    )
    return _checked(corpus)


def _checked(corpus: Corpus) -> Corpus:
    for split in ("train", "val"):
        size = getattr(corpus, split).size
        if size < MIN_SPLIT_BYTES:
            raise DataError(
                f"--data {corpus.root!r}: the {split} split has {size} bytes, "
                f"but expected at least {MIN_SPLIT_BYTES} (give more text)"
            )
    return corpus


def train_batch(data: np.ndarray, seed: int, step: int, batch: int, seq: int) -> np.ndarray:
    """The ``step``-th training batch: ``batch`` windows of ``seq + 1`` bytes at random offsets.

    Returns int32 (batch, seq + 1); inputs are ``[:, :-1]``, targets ``[:, 1:]``. The offsets
    depend only on (seed, step), so a resumed run sees exactly the batches it would have seen.
    """
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, data.size - seq - 1, size=batch)
    return np.stack([data[s : s + seq + 1] for s in starts]).astype(np.int32)


def val_batches(data: np.ndarray, batch: int, seq: int, n_batches: int) -> list[np.ndarray]:
    """Fixed validation batches: consecutive, non-overlapping windows from the start of ``data``.

    Raises DataError when the validation split holds fewer than ``n_batches`` batches.
    """
    per = seq + 1
    need = n_batches * batch * per
    if need > data.size:
        raise DataError(
            f"validation needs {need} bytes ({n_batches} batches of {batch} x {per}), "
            f"but the split has {data.size}; lower --eval-batches"
        )
    windows = data[:need].reshape(n_batches, batch, per).astype(np.int32)
    return list(windows)
