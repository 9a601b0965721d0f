"""Datasets: seeded synthetic prompts and their length distributions, JSONL and trtllm-bench files."""

from __future__ import annotations

import os
import statistics
from pathlib import Path

import orjson
import pytest

from rackscope.errors import ConfigError
from rackscope.runner.datasets import (
    MAX_SEQUENCE_TOKENS,
    WORDS,
    SyntheticDataset,
    load_dataset,
    open_file,
    trtllm_lines,
)


def test_synthetic_fixed_lengths_words_and_ids() -> None:
    ds = SyntheticDataset(input_len=200, output_len=50, seed=3, content="both")
    req = ds.request(0, "r0")
    assert req.request_id == "r0"
    assert req.input_tokens == 200
    assert req.max_output_tokens == 50
    assert req.prompt is not None
    words = req.prompt.split(" ")
    assert len(words) == 200
    assert set(words) <= set(WORDS)
    assert req.input_ids is not None
    assert len(req.input_ids) == 200
    assert all(1000 <= i < 30000 for i in req.input_ids)


@pytest.mark.parametrize(
    ("content", "has_prompt", "has_ids"),
    [("text", True, False), ("ids", False, True), ("both", True, True), ("lengths", False, False)],
)
def test_synthetic_content(content: str, has_prompt: bool, has_ids: bool) -> None:
    req = SyntheticDataset(input_len=10, output_len=5, content=content).request(7, "x")
    assert (req.prompt is not None) is has_prompt
    assert (req.input_ids is not None) is has_ids
    assert req.input_tokens == 10


def test_synthetic_is_seeded_per_index() -> None:
    a = SyntheticDataset(input_len=30, output_len=10, distribution="uniform", seed=1)
    b = SyntheticDataset(input_len=30, output_len=10, distribution="uniform", seed=1)
    c = SyntheticDataset(input_len=30, output_len=10, distribution="uniform", seed=2)
    # The same index gives the same sample whatever was drawn before it.
    assert a.sample(5) == b.sample(5)
    b.sample(1)
    b.sample(9)
    assert a.sample(5) == b.sample(5)
    assert [a.sample(i) for i in range(10)] != [c.sample(i) for i in range(10)]


@pytest.mark.parametrize("dist", ["uniform", "normal", "lognormal"])
def test_length_distributions_keep_the_mean(dist: str) -> None:
    ds = SyntheticDataset(input_len=400, output_len=200, distribution=dist, spread=0.25, seed=0, content="lengths")
    ins = [ds.sample(i).input_tokens for i in range(4000)]
    outs = [ds.sample(i).output_tokens for i in range(4000)]
    assert statistics.fmean(ins) == pytest.approx(400, rel=0.02)
    assert statistics.fmean(outs) == pytest.approx(200, rel=0.02)
    assert min(ins) >= 1
    if dist == "uniform":
        assert min(ins) >= 300
        assert max(ins) <= 500
    else:
        # Coefficient of variation is the spread.
        assert statistics.stdev(ins) / statistics.fmean(ins) == pytest.approx(0.25, rel=0.1)
    assert len(set(ins)) > 50


def test_synthetic_rejects_bad_settings() -> None:
    with pytest.raises(ConfigError, match="at least 1"):
        SyntheticDataset(input_len=0)
    with pytest.raises(ConfigError, match="distribution"):
        SyntheticDataset(distribution="zipf")
    with pytest.raises(ConfigError, match="content"):
        SyntheticDataset(content="audio")


def _write(path: Path, lines: list[object]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(obj) + b"\n" if not isinstance(obj, bytes) else obj for obj in lines))
    return path


def test_jsonl_prompt_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "prompts.jsonl", [
        {"prompt": "hello there friend", "max_tokens": 16},
        b"\n",
        {"prompt": "a b c d e f g h i j", "output_tokens": 8, "input_tokens": 12},
    ])
    ds = load_dataset(path, "jsonl")
    assert len(ds) == 2
    assert ds.finite
    r0, r1, r2 = ds.request(0, "a"), ds.request(1, "b"), ds.request(2, "c")
    assert (r0.prompt, r0.max_output_tokens, r0.input_tokens) == ("hello there friend", 16, 4)
    assert (r1.max_output_tokens, r1.input_tokens) == (8, 12)
    assert r2.prompt == r0.prompt  # cycles
    assert ds.describe()["output_tokens_mean"] == 12.0


def test_trtllm_bench_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "bench.jsonl", [
        {"task_id": 0, "input_ids": [5, 6, 7], "output_tokens": 4},
        {"task_id": "b", "prompt": "one two", "output_tokens": 2},
    ])
    ds = load_dataset(path, "trtllm")
    r0, r1 = ds.request(0, "x"), ds.request(1, "y")
    assert (r0.input_ids, r0.input_tokens, r0.max_output_tokens, r0.prompt) == ([5, 6, 7], 3, 4, None)
    assert (r1.prompt, r1.max_output_tokens) == ("one two", 2)


def test_trtllm_lines_round_trip(tmp_path: Path) -> None:
    synthetic = SyntheticDataset(input_len=20, output_len=7, content="ids", seed=4)
    path = tmp_path / "gen.jsonl"
    path.write_bytes(b"".join(trtllm_lines(synthetic, 5)))
    ds = load_dataset(path, "trtllm")
    assert len(ds) == 5
    assert ds.request(3, "q").input_ids == synthetic.request(3, "q").input_ids
    assert ds.request(3, "q").max_output_tokens == 7


@pytest.mark.parametrize(
    ("fmt", "lines", "message"),
    [
        ("jsonl", [{"prompt": "ok", "max_tokens": 1}, {"prompt": "ok", "max_tokens": 1}, b"{not json\n"],
         r"bad\.jsonl:3: not valid JSON"),
        ("jsonl", [{"prompt": "x"}], r"bad\.jsonl:1: give the output length"),
        ("jsonl", [{"prompt": "x", "max_tokens": 0}], r"bad\.jsonl:1: 'max_tokens' must be a positive integer"),
        ("jsonl", [{"prompt": "", "max_tokens": 3}], r"bad\.jsonl:1: 'prompt' must be a non-empty string"),
        ("jsonl", [[1, 2]], r"bad\.jsonl:1: expected a JSON object"),
        ("trtllm", [{"task_id": 1, "prompt": "p", "output_tokens": 2}, {"prompt": "p", "output_tokens": 2}],
         r"bad\.jsonl:2: trtllm-bench lines need a 'task_id'"),
        ("trtllm", [{"task_id": 1, "input_ids": [1, "a"], "output_tokens": 2}],
         r"bad\.jsonl:1: 'input_ids' must be a non-empty list of integers"),
        ("trtllm", [{"task_id": 1, "output_tokens": 2}], r"bad\.jsonl:1: .*'prompt' \(a string\) or 'input_ids'"),
        ("jsonl", [], r"bad\.jsonl: the dataset holds no samples"),
    ],
)
def test_bad_files_name_file_and_line(tmp_path: Path, fmt: str, lines: list[object], message: str) -> None:
    path = _write(tmp_path / "bad.jsonl", lines)
    with pytest.raises(ConfigError, match=message):
        load_dataset(path, fmt)


def test_missing_file_and_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read dataset"):
        load_dataset(tmp_path / "nope.jsonl")
    with pytest.raises(ConfigError, match="--dataset-format"):
        load_dataset(tmp_path / "nope.jsonl", "csv")


def test_seeded_lengths_do_not_depend_on_order_across_blocks() -> None:
    def make(content: str) -> SyntheticDataset:
        return SyntheticDataset(input_len=300, output_len=100, distribution="lognormal", seed=7, content=content)

    forward, backward = make("lengths"), make("lengths")
    indices = [0, 1, 255, 256, 257, 5000, 100_000]
    want = [forward.sample(i) for i in indices]
    for far in range(0, 40 * 256, 256):  # asks in other blocks push the first ones out of the cache
        backward.sample(far + 3)
    assert [backward.sample(i) for i in reversed(indices)] == list(reversed(want))
    # What a request carries does not change its lengths.
    text = make("text")
    req = forward.request(257, "x")
    assert (req.prompt, req.input_ids) == (None, None)
    assert (text.sample(257).input_tokens, text.sample(257).output_tokens) == (req.input_tokens, req.max_output_tokens)
    assert len({(s.input_tokens, s.output_tokens) for s in want}) > 1  # drawn, not fixed


# --- which files are read --------------------------------------------------------------------------
GOOD_LINE = {"prompt": "hello there", "max_tokens": 3}


def test_only_regular_files_within_the_size_limit_are_read(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "dir").mkdir()
    big = _write(tmp_path / "big.jsonl", [GOOD_LINE] * 100)
    with pytest.raises(ConfigError, match="not a regular file"):
        load_dataset(tmp_path / "pipe")  # a FIFO with no writer: refused, not waited on
    with pytest.raises(ConfigError, match="not a regular file"):
        load_dataset("/dev/zero")
    with pytest.raises(ConfigError, match="is a directory"):
        load_dataset(tmp_path / "dir")
    with pytest.raises(ConfigError, match="the limit is 1,000"):
        load_dataset(big, max_bytes=1000)
    assert len(load_dataset(big, max_bytes=big.stat().st_size)) == 100
    (tmp_path / "link.jsonl").symlink_to(big)  # the local user may name any file, links too
    assert len(load_dataset(tmp_path / "link.jsonl")) == 100


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("/etc/hostname", "relative to the agent's data directory"),
        ("../outside.jsonl", "must not contain '..'"),
        ("sub/../../outside.jsonl", "must not contain '..'"),
        ("escape.jsonl", "outside the agent's data directory"),
        ("subescape/outside.jsonl", "outside the agent's data directory"),
        ("zero", "outside the agent's data directory"),
        ("pipe", "not a regular file"),
        ("sub", "is a directory"),
        (".", "outside the agent's data directory"),
        ("", "non-empty"),
        ("nul\x00", "non-empty"),
        ("missing.jsonl", "No such file"),
    ],
)
def test_names_resolve_only_inside_the_root(tmp_path: Path, name: str, message: str) -> None:
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    _write(tmp_path / "outside.jsonl", [GOOD_LINE])
    (root / "escape.jsonl").symlink_to(tmp_path / "outside.jsonl")
    (root / "subescape").symlink_to(tmp_path)
    (root / "zero").symlink_to("/dev/zero")
    os.mkfifo(root / "pipe")
    with pytest.raises(ConfigError, match=message):
        load_dataset(name, root=root)


def test_names_inside_the_root_are_read_links_within_it_too(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "sets").mkdir(parents=True)
    _write(root / "sets" / "a.jsonl", [GOOD_LINE] * 2)
    (root / "latest.jsonl").symlink_to(root / "sets" / "a.jsonl")
    assert len(load_dataset("sets/a.jsonl", root=root)) == 2
    assert len(load_dataset("latest.jsonl", root=root)) == 2
    assert load_dataset("sets/a.jsonl", root=root).describe()["file"] == "a.jsonl"
    with pytest.raises(ConfigError, match="the limit is 10"):
        load_dataset("sets/a.jsonl", root=root, max_bytes=10)


def test_lengths_beyond_the_token_bound_are_refused_or_capped(tmp_path: Path) -> None:
    path = _write(tmp_path / "long.jsonl", [{"prompt": "x", "max_tokens": MAX_SEQUENCE_TOKENS + 1}])
    with pytest.raises(ConfigError, match="at most 1,048,576"):
        load_dataset(path)
    wide = SyntheticDataset(input_len=MAX_SEQUENCE_TOKENS, output_len=10, distribution="lognormal", spread=10.0,
                            content="lengths")
    assert max(wide.sample(i).input_tokens for i in range(2000)) <= MAX_SEQUENCE_TOKENS


def test_a_file_that_grows_after_the_check_is_not_read_past_the_limit(tmp_path: Path) -> None:
    path = _write(tmp_path / "grows.jsonl", [GOOD_LINE])
    handle = open_file(path, max_bytes=path.stat().st_size + 10)
    with path.open("ab") as more:
        more.write(b"x" * 100)
    with handle, pytest.raises(ConfigError, match="grew past its size limit"):
        handle.read()
