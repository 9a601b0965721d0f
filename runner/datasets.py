"""Workload datasets: synthetic prompts of a chosen length, JSONL prompt files and trtllm-bench files.

A dataset hands out ``Request`` objects by index and cycles when a run needs more requests
than it holds. Synthetic prompts are made of common English words that tokenisers such as
Llama's and GPT's turn into one token each (with the leading space), so a server tokenises a
prompt of N words to about N tokens; a request can carry N token ids instead (or as well)
for engines that take ids, or only its lengths for the simulated engine.
"""

from __future__ import annotations

import io
import math
import os
import random
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

import orjson

from rackscope.errors import ConfigError
from rackscope.runner.engines.base import Request
from rackscope.runner.jsonl import read_objects

DISTRIBUTIONS = ("fixed", "uniform", "normal", "lognormal")
FILE_FORMATS = ("jsonl", "trtllm")
# Longest prompt or output of one request, in tokens (the run settings' bound on lengths too):
# far beyond any model's context today, yet a drawn or read length can never ask for more.
MAX_SEQUENCE_TOKENS = 1_048_576
# Largest dataset file read, unless the caller allows more (the agent's --dataset-max-mib).
DEFAULT_DATASET_MAX_BYTES = 256 * 1024 * 1024

# Words that are a single token (with their leading space) in the Llama 2/3 and GPT-4
# tokenisers; short and common so no tokeniser splits them.
WORDS: tuple[str, ...] = (
    "the", "of", "and", "to", "in", "is", "was", "for", "on", "as", "with", "by", "at", "from", "that", "this",
    "are", "be", "or", "an", "it", "not", "but", "have", "has", "had", "were", "which", "their", "all", "one",
    "can", "will", "more", "when", "there", "been", "who", "new", "some", "time", "than", "may", "other",
    "two", "would", "into", "after", "first", "also", "made", "only", "over", "most", "year", "many", "use",
    "these", "then", "such", "state", "city", "part", "people", "she", "out", "years", "well", "back",
    "through", "him", "between", "where", "used", "about", "because", "during", "before", "while", "work",
    "under", "school", "world", "three", "since", "both", "its", "each", "high", "life", "long", "same",
    "group", "second", "just", "found", "later", "name", "game", "family", "early", "area", "home", "small",
    "team", "water", "number", "system", "day", "great", "man", "old", "way", "house", "must", "good", "power",
    "own", "play", "light", "land", "line", "right", "end", "place", "war", "film", "best", "set", "music",
    "left", "last", "country", "order", "might", "point", "make", "less", "field", "book", "party", "public",
)
# Token ids handed to engines that take ids: an ordinary range of a 32k vocabulary, away
# from the special and byte tokens at the bottom.
TOKEN_ID_LOW = 1000
TOKEN_ID_HIGH = 30000
_TOKEN_IDS = range(TOKEN_ID_LOW, TOKEN_ID_HIGH)
# What a synthetic request carries: a text prompt, token ids, both, or only its lengths (for
# the simulated engine, which needs nothing else and is spared building 1,000-word prompts).
CONTENTS = ("text", "ids", "both", "lengths")
# Synthetic lengths are drawn a block of indices at a time from one generator seeded by
# (seed, block): a new generator per request costs more than the draws themselves.
LENGTH_BLOCK = 256
LENGTH_BLOCKS_KEPT = 8  # blocks cached; issuers ask in (nearly) increasing order


class Dataset(Protocol):
    """What a scenario draws requests from."""

    name: str

    def __len__(self) -> int:
        """Number of distinct samples (a synthetic dataset reports how many it was asked for)."""
        ...

    @property
    def finite(self) -> bool:
        """True when the dataset is a file whose length bounds a run by default."""
        ...

    def request(self, index: int, request_id: str) -> Request: ...

    def describe(self) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class Sample:
    """One prompt and its wanted output length."""

    prompt: str | None
    input_ids: tuple[int, ...] | None
    input_tokens: int
    output_tokens: int
    task_id: str | None = None

    def request(self, request_id: str) -> Request:
        return Request(
            request_id=request_id,
            prompt=self.prompt,
            input_ids=list(self.input_ids) if self.input_ids is not None else None,
            input_tokens=self.input_tokens,
            max_output_tokens=self.output_tokens,
        )


def draw_length(rng: random.Random, mean: float, distribution: str, spread: float) -> int:
    """A length around ``mean``: ``spread`` is the half-width (uniform) or the coefficient of
    variation (normal, lognormal) relative to the mean. Never below 1."""
    if distribution == "fixed" or spread <= 0.0:
        value = mean
    elif distribution == "uniform":
        value = rng.uniform(mean * (1.0 - spread), mean * (1.0 + spread))
    elif distribution == "normal":
        value = rng.gauss(mean, mean * spread)
    elif distribution == "lognormal":
        # sigma and mu chosen so the mean stays `mean` and the CV is `spread`.
        sigma = math.sqrt(math.log1p(spread * spread))
        value = rng.lognormvariate(math.log(mean) - sigma * sigma / 2.0, sigma)
    else:
        raise ConfigError(f"length distribution must be one of {', '.join(DISTRIBUTIONS)}, not {distribution!r}")
    return min(MAX_SEQUENCE_TOKENS, max(1, round(value)))


def words_prompt(rng: random.Random, n_tokens: int) -> str:
    """A prompt of ``n_tokens`` single-token words."""
    return " ".join(rng.choices(WORDS, k=n_tokens))


class SyntheticDataset:
    """Seeded synthetic requests: sample ``i`` is the same for a given seed in every run."""

    def __init__(
        self,
        input_len: int = 1024,
        output_len: int = 128,
        distribution: str = "fixed",
        spread: float = 0.25,
        seed: int = 0,
        samples: int = 0,
        content: str = "text",
    ) -> None:
        if input_len < 1 or output_len < 1:
            raise ConfigError("--input-len and --output-len must be at least 1")
        if distribution not in DISTRIBUTIONS:
            raise ConfigError(f"length distribution must be one of {', '.join(DISTRIBUTIONS)}, not {distribution!r}")
        if not 0.0 <= spread < 1.0 and distribution in ("uniform",):
            raise ConfigError("--length-spread for a uniform distribution must be in [0, 1)")
        if spread < 0.0:
            raise ConfigError("--length-spread must not be negative")
        if content not in CONTENTS:
            raise ConfigError(f"prompt content must be one of {', '.join(CONTENTS)}, not {content!r}")
        self.name = "synthetic"
        self.input_len = input_len
        self.output_len = output_len
        self.distribution = distribution
        self.spread = spread
        self.seed = seed
        self.samples = samples
        self.content = content
        self._blocks: dict[int, list[tuple[int, int]]] = {}  # block index -> its drawn lengths

    def __len__(self) -> int:
        return self.samples

    @property
    def finite(self) -> bool:
        return False

    def lengths(self, index: int) -> tuple[int, int]:
        """(input, output) tokens of sample ``index``: the same for a given seed whatever
        was asked before, since each block of indices has its own seeded generator."""
        if self.distribution == "fixed" or self.spread <= 0.0:
            return self.input_len, self.output_len
        block, offset = divmod(index, LENGTH_BLOCK)
        drawn = self._blocks.get(block)
        if drawn is None:
            rng = random.Random(f"lengths/{self.seed}/{block}")
            mean_in, mean_out, dist, spread = self.input_len, self.output_len, self.distribution, self.spread
            drawn = [
                (draw_length(rng, mean_in, dist, spread), draw_length(rng, mean_out, dist, spread))
                for _ in range(LENGTH_BLOCK)
            ]
            if len(self._blocks) >= LENGTH_BLOCKS_KEPT:
                self._blocks.pop(next(iter(self._blocks)), None)
            self._blocks[block] = drawn
        return drawn[offset]

    def sample(self, index: int) -> Sample:
        n_in, n_out = self.lengths(index)
        content = self.content
        prompt = ids = None
        if content != "lengths":
            # One generator per index (not one shared stream) so a prompt does not depend on
            # how many were drawn before it, whatever order concurrent issuers ask in.
            rng = random.Random(self.seed * 1_000_003 + index)
            prompt = words_prompt(rng, n_in) if content in ("text", "both") else None
            ids = tuple(rng.choices(_TOKEN_IDS, k=n_in)) if content in ("ids", "both") else None
        return Sample(prompt, ids, n_in, n_out, task_id=str(index))

    def request(self, index: int, request_id: str) -> Request:
        if self.content == "lengths":  # the simulated engine's hot path: no prompt to build
            n_in, n_out = self.lengths(index)
            return Request(request_id=request_id, input_tokens=n_in, max_output_tokens=n_out)
        return self.sample(index).request(request_id)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "synthetic",
            "input_len": self.input_len,
            "output_len": self.output_len,
            "distribution": self.distribution,
            "spread": self.spread,
            "seed": self.seed,
            "content": self.content,
        }


class FileDataset:
    """Samples read from a file; requests cycle through them in order."""

    def __init__(self, path: Path, fmt: str, samples: list[Sample]) -> None:
        if not samples:
            raise ConfigError(f"{path}: the dataset holds no samples")
        self.name = path.name
        self.path = path
        self.format = fmt
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def finite(self) -> bool:
        return True

    def request(self, index: int, request_id: str) -> Request:
        return self.samples[index % len(self.samples)].request(request_id)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "file",
            "format": self.format,
            "file": self.path.name,
            "samples": len(self.samples),
            "input_tokens_mean": sum(s.input_tokens for s in self.samples) / len(self.samples),
            "output_tokens_mean": sum(s.output_tokens for s in self.samples) / len(self.samples),
        }


def estimate_tokens(text: str) -> int:
    """About how many tokens a tokeniser makes of English text (~1.3 per word)."""
    return max(1, round(len(text.split()) * 1.3))


# --- opening dataset files -------------------------------------------------------------------
_READ_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK  # a FIFO must not block the open


def open_file(path: str | Path, max_bytes: int = DEFAULT_DATASET_MAX_BYTES) -> io.BufferedReader:
    """Open a dataset file the local user named (symbolic links followed): only a regular file
    of at most ``max_bytes``, checked on the opened descriptor so it cannot change in between."""
    try:
        fd = os.open(path, _READ_FLAGS)
    except OSError as exc:
        raise ConfigError(f"cannot read dataset {path}: {exc.strerror or exc}") from exc
    return _checked(fd, str(path), max_bytes)


def open_inside(root: str | Path, name: str, max_bytes: int = DEFAULT_DATASET_MAX_BYTES) -> io.BufferedReader:
    """Open ``name``, a path relative to the directory ``root``, for a caller who may read only
    inside it: no absolute paths, no ``..``, no symbolic link that leads out of ``root``; then
    the checks of ``open_file``. Each directory on the way is opened without following links
    (its real path was checked first), so swapping one for a link while this runs fails."""
    if not name or "\x00" in name:
        raise ConfigError("dataset must be a non-empty file name")
    relative = PurePosixPath(name)
    if relative.is_absolute():
        raise ConfigError("dataset must be a path relative to the agent's data directory, not an absolute path")
    if ".." in relative.parts:
        raise ConfigError("dataset must not contain '..': name a file inside the agent's data directory")
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(real_root, name))
    if real == real_root or os.path.commonpath([real_root, real]) != real_root:
        raise ConfigError(f"dataset {name} resolves outside the agent's data directory (a symbolic link leaving it?)")
    parts = PurePosixPath(os.path.relpath(real, real_root)).parts
    try:
        dir_fd = os.open(real_root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"cannot open the data directory: {exc.strerror or exc}") from exc
    try:
        for part in parts[:-1]:
            inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
            os.close(dir_fd)
            dir_fd = inner
        fd = os.open(parts[-1], _READ_FLAGS | os.O_NOFOLLOW, dir_fd=dir_fd)
    except OSError as exc:
        raise ConfigError(f"cannot read dataset {name}: {exc.strerror or exc}") from exc
    finally:
        os.close(dir_fd)
    return _checked(fd, name, max_bytes)


def _checked(fd: int, name: str, max_bytes: int) -> io.BufferedReader:
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise ConfigError(f"dataset {name} is a directory, not a file")
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"dataset {name} is not a regular file (a device, FIFO or socket)")
        if info.st_size > max_bytes:
            raise ConfigError(
                f"dataset {name} is {info.st_size:,} bytes; the limit is {max_bytes:,} (--dataset-max-mib)"
            )
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return io.BufferedReader(_CappedReader(fd, name, max_bytes))


class _CappedReader(io.RawIOBase):
    """A file descriptor read up to a byte limit: a file that grows after it was checked ends
    the read with an error instead of being read on."""

    def __init__(self, fd: int, name: str, max_bytes: int) -> None:
        super().__init__()
        self.fd = fd
        self.name_shown = name
        self.left = max_bytes

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = os.read(self.fd, min(len(view), self.left + 1))
        if len(data) > self.left:
            raise ConfigError(f"dataset {self.name_shown} grew past its size limit while being read")
        self.left -= len(data)
        view[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            os.close(self.fd)
        super().close()


def _positive_int(path: Path, lineno: int, obj: dict[str, Any], key: str) -> int:
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SEQUENCE_TOKENS:
        raise ConfigError(
            f"{path}:{lineno}: {key!r} must be a positive integer of at most {MAX_SEQUENCE_TOKENS:,}, not {value!r}"
        )
    return value


def _prompt_sample(path: Path, lineno: int, obj: dict[str, Any]) -> Sample:
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise ConfigError(f"{path}:{lineno}: 'prompt' must be a non-empty string")
    keys = [k for k in ("max_tokens", "output_tokens") if k in obj]
    if not keys:
        raise ConfigError(f"{path}:{lineno}: give the output length as 'max_tokens' or 'output_tokens'")
    out = _positive_int(path, lineno, obj, keys[0])
    n_in = _positive_int(path, lineno, obj, "input_tokens") if "input_tokens" in obj else estimate_tokens(prompt)
    return Sample(prompt, None, n_in, out, task_id=str(obj["id"]) if "id" in obj else None)


def _trtllm_sample(path: Path, lineno: int, obj: dict[str, Any]) -> Sample:
    if "task_id" not in obj:
        raise ConfigError(f"{path}:{lineno}: trtllm-bench lines need a 'task_id'")
    if "output_tokens" not in obj:
        raise ConfigError(f"{path}:{lineno}: trtllm-bench lines need 'output_tokens'")
    out = _positive_int(path, lineno, obj, "output_tokens")
    ids = obj.get("input_ids")
    prompt = obj.get("prompt")
    if ids is not None:
        if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise ConfigError(f"{path}:{lineno}: 'input_ids' must be a non-empty list of integers")
        if len(ids) > MAX_SEQUENCE_TOKENS:
            raise ConfigError(f"{path}:{lineno}: 'input_ids' holds more than {MAX_SEQUENCE_TOKENS:,} tokens")
        return Sample(prompt if isinstance(prompt, str) else None, tuple(ids), len(ids), out, str(obj["task_id"]))
    if not isinstance(prompt, str) or not prompt:
        raise ConfigError(f"{path}:{lineno}: trtllm-bench lines need 'prompt' (a string) or 'input_ids'")
    return Sample(prompt, None, estimate_tokens(prompt), out, str(obj["task_id"]))


def load_dataset(
    path: str | Path,
    fmt: str = "jsonl",
    *,
    root: str | Path | None = None,
    max_bytes: int = DEFAULT_DATASET_MAX_BYTES,
) -> FileDataset:
    """Read a JSONL prompt file (``{"prompt", "max_tokens" | "output_tokens"}``) or a
    trtllm-bench dataset (``{"task_id", "prompt" | "input_ids", "output_tokens"}``).

    With ``root``, ``path`` names a file inside that directory (``open_inside``): what a remote
    caller may name. Either way only a regular file of at most ``max_bytes`` is read."""
    if fmt not in FILE_FORMATS:
        raise ConfigError(f"--dataset-format must be one of {', '.join(FILE_FORMATS)}, not {fmt!r}")
    handle = open_file(path, max_bytes) if root is None else open_inside(root, str(path), max_bytes)
    path = Path(path)
    parse = _prompt_sample if fmt == "jsonl" else _trtllm_sample
    with handle:
        samples = [parse(path, lineno, obj) for lineno, obj in read_objects(path, ConfigError, "dataset", handle)]
    return FileDataset(path, fmt, samples)


def trtllm_lines(dataset: SyntheticDataset | FileDataset, count: int) -> Iterator[bytes]:
    """``count`` requests of a dataset as trtllm-bench dataset lines (for engines that hand
    trtllm-bench a file)."""
    for i in range(count):
        req = dataset.request(i, str(i))
        line: dict[str, Any] = {"task_id": i, "output_tokens": req.max_output_tokens}
        if req.input_ids is not None:
            line["input_ids"] = req.input_ids
        else:
            line["prompt"] = req.prompt
        yield orjson.dumps(line) + b"\n"
