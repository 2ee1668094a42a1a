"""C4 shards -> tokens -> packed blocks, with the `c4_mlperf` semantics of the reference.

Files: train2 is `c4-train.{i:05d}-of-01024.json[.gz]` for i in `dataset.train_shards`
(768..1023 for the benchmark); validation is `c4-validation_24567exp.json[.gz]`. Paths are
local or any fsspec URL (gs:// needs the optional gcsfs).

Training stream: shard order shuffled per epoch with the seed, documents tokenized (no
BOS/EOS) and concatenated, cut into `max_length` blocks, blocks passed through a seeded shuffle
buffer. The stream is a pure function of (config, seed). A checkpoint saves its position (see
TrainStream) so a resumed run continues with the next block without re-tokenizing (or even
parsing) what it consumed; a checkpoint without one replays (skips) the consumed blocks instead.
Labels equal inputs (the model shifts them).

Eval set: the first `n_eval_examples` documents, packed the same way; the last partial block is
padded (inputs with `pad_token_id`, a real id; labels with -100), then whole rows of padding are
added until the row count is a multiple of the global eval batch. Padding carries zero weight.

Why this module is long: the train stream and its saved position are one contract (a resume
reads exactly the blocks that follow): the shard reader, the packing, the shuffle buffer and the
position live together; the eval set shares the reader and the tokenization.
"""

from __future__ import annotations

import gzip
import itertools
import json
import random
import warnings
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import fsspec
import torch

from clm.tokenizer import Tokenizer

IGNORE_INDEX = -100
VALIDATION_FILE = "c4-validation_24567exp.json"
TOKENIZE_BATCH = 64


class DataError(ValueError):
    """Bad input data; the message names the file (and line)."""


def train_shard_name(index: int, total: int = 1024) -> str:
    return f"c4-train.{index:05d}-of-{total:05d}.json"


def _join(directory: str, name: str) -> str:
    return directory.rstrip("/") + "/" + name


def find_file(directory: str, name: str) -> str:
    """`name` or `name.gz` in `directory`; DataError naming both when neither exists."""
    try:
        fs, root = fsspec.core.url_to_fs(directory)
    except ImportError as e:
        raise DataError(f"{directory}: cannot open ({e}); install the 'gcs' extra") from e
    for candidate in (name, name + ".gz"):
        if fs.exists(_join(root, candidate)):
            return _join(directory, candidate)
    raise DataError(f"{_join(directory, name)}: missing data file (also looked for .gz)")


def train_files(directory: str, first: int, last: int) -> list[str]:
    return [find_file(directory, train_shard_name(i)) for i in range(first, last)]


def read_texts(url: str, on_bad_record: Callable[[DataError], None] | None = None) -> Iterator[str]:
    """The `text` of each JSON line of a C4 file, with errors naming file and line.

    A malformed record (not JSON, no string `text`) raises, or is passed to `on_bad_record` and
    skipped when one is given. An unreadable file (truncated gzip, bad encoding) always raises.
    """
    for _, text in read_records(url, on_bad_record):
        if text is not None:
            yield text


def read_records(
    url: str,
    on_bad_record: Callable[[DataError], None] | None = None,
    start_line: int = 0,
) -> Iterator[tuple[int, str | None]]:
    """(line number, text) of each non-empty line after the first `start_line` lines.

    The skipped lines are read but not parsed (resuming a stream costs a decompression, not a
    re-tokenization). A malformed record raises, or yields `(line, None)` after being passed to
    `on_bad_record`. A file with fewer than `start_line` lines raises: it changed since the
    position was saved.
    """
    line_no = 0
    try:
        with fsspec.open(url, "rt", compression="infer", encoding="utf-8") as f:
            line_no = sum(1 for _ in itertools.islice(f, start_line))
            if line_no < start_line:
                raise DataError(
                    f"{url}: has {line_no} lines, fewer than the saved data position (line "
                    f"{start_line}); the file changed since the checkpoint"
                )
            for line_no, line in enumerate(f, start=start_line + 1):
                if not line.strip():
                    continue
                try:
                    yield line_no, _record_text(url, line_no, line)
                except DataError as e:
                    if on_bad_record is None:
                        raise
                    on_bad_record(e)
                    yield line_no, None
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile, UnicodeDecodeError) as e:
        if isinstance(e, FileNotFoundError):
            raise DataError(f"{url}: missing data file") from e
        raise DataError(f"{url}: unreadable after line {line_no} ({e})") from e


def _record_text(url: str, line_no: int, line: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{url}:{line_no}: not a JSON line ({e.msg})") from e
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise DataError(f"{url}:{line_no}: record has no string 'text' field")
    return record["text"]


def tokenize_stream(texts: Iterator[str], tokenizer: Tokenizer) -> Iterator[list[int]]:
    """Token ids per document, tokenized in batches for speed."""
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == TOKENIZE_BATCH:
            yield from tokenizer.encode(batch)
            batch = []
    if batch:
        yield from tokenizer.encode(batch)


def pack(
    docs: Iterator[list[int]], max_length: int, leftover: list[int] | None = None
) -> Iterator[list[int]]:
    """Concatenate documents and cut full blocks of max_length.

    The tokens after the last full block are stored in `leftover` when one is given.
    """
    buffer: list[int] = []
    for ids in docs:
        buffer.extend(ids)
        while len(buffer) >= max_length:
            yield buffer[:max_length]
            buffer = buffer[max_length:]
    if leftover is not None:
        leftover[:] = buffer


def pack_with_remainder(docs: Iterator[list[int]], max_length: int) -> list[list[int]]:
    """All blocks, the last one partial (unpadded) if tokens are left over."""
    leftover: list[int] = []
    blocks = list(pack(docs, max_length, leftover))
    if leftover:
        blocks.append(leftover)
    return blocks


POSITION_VERSION = 1


@dataclass
class TrainStream:
    """Endless stream of packed training blocks, epoch after epoch, deterministic per seed.

    `streaming=False` reads every shard into memory once and shuffles whole epochs of blocks;
    `streaming=True` reads shard by shard through a shuffle buffer (constant memory).

    Resume: `blocks()`/`batches()` return an iterator whose `state_dict()` is its position
    (plain values and int32 tensors, for `torch.save` and `torch.load(weights_only=True)`).
    Streaming: epoch, shard in the epoch's shuffled order, lines of that shard consumed, the
    packer's carried-over tokens, the shuffle buffer and its RNG state. In memory: epoch and index.
    Passing that position back continues with exactly the blocks an uninterrupted stream yields,
    without re-tokenizing anything already consumed (the current shard's consumed lines are read
    and skipped unparsed). Without a position, or with one saved under different data settings,
    the stream replays `skip` blocks instead.
    """

    files: list[str]
    tokenizer: Tokenizer
    max_length: int
    seed: int
    shuffle: bool = True
    streaming: bool = True
    shuffle_buffer_size: int = 256
    skip_bad_records: bool = False
    skipped_records: int = 0  # malformed records skipped so far (with skip_bad_records)
    _iterator: _Blocks | None = field(default=None, init=False, repr=False, compare=False)

    def _on_bad_record(self, error: DataError) -> None:
        self.skipped_records += 1

    def _texts(self, url: str) -> Iterator[str]:
        return read_texts(url, self._on_bad_record if self.skip_bad_records else None)

    def _epoch_rng(self, epoch: int) -> random.Random:
        return random.Random(self.seed * 1_000_003 + epoch)

    def _too_short(self) -> DataError:
        return DataError(
            f"{self.files[0]}...: fewer than max_length={self.max_length} tokens in all train "
            "shards"
        )

    def settings(self) -> dict:
        """What a saved position depends on: it is only valid for a stream with the same."""
        return {
            "files": [url.rstrip("/").rsplit("/", 1)[-1] for url in self.files],
            "max_length": self.max_length,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "streaming": self.streaming,
            "shuffle_buffer_size": self.shuffle_buffer_size if self.streaming else None,
        }

    def blocks(self, skip: int = 0, position: dict | None = None) -> _Blocks:
        """The block stream after `skip` blocks: from `position` when usable, else by replay.

        Nothing is read until the first block is asked for (the MLPerf clock is running then).
        """
        kind = _StreamingBlocks if self.streaming else _InMemoryBlocks
        problem = None if position is None else self._position_problem(position, skip)
        if problem is not None:
            warnings.warn(
                f"data position not used ({problem}); replaying {skip} blocks instead",
                stacklevel=2,
            )
            position = None

        def start() -> _Blocks:
            blocks = kind(self, position)
            for _ in range(0 if position is not None else skip):
                next(blocks)
            return blocks

        self._iterator = _LazyBlocks(start, position)
        return self._iterator

    def _position_problem(self, position: dict, skip: int) -> str | None:
        if position.get("version") != POSITION_VERSION:
            return f"format version {position.get('version')}, expected {POSITION_VERSION}"
        saved, now = position["settings"], self.settings()
        for key in now:
            if saved.get(key) != now[key]:
                return f"saved with {key}={saved.get(key)}, this run has {key}={now[key]}"
        if int(position["blocks"]) != skip:
            return f"it is after {position['blocks']} blocks, the checkpoint's step after {skip}"
        return None

    def state_dict(self) -> dict | None:
        """The position of the iterator `blocks()`/`batches()` returned last (None before)."""
        return None if self._iterator is None else self._iterator.state_dict()

    def batches(
        self, rows: int, skip_blocks: int = 0, position: dict | None = None
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Batches of `rows` blocks: input_ids and labels, int64 [rows, max_length]."""
        return _batches(self.blocks(skip_blocks, position), rows)


def describe_position(position: dict | None) -> str:
    """One line for a saved stream position (or its absence)."""
    if not position:
        return "no saved position, replays the consumed blocks"
    if "shard" not in position:
        return f"epoch {position['epoch']}, block {position['index']} of the in-memory order"
    shard = position["shard_file"] or "end of the shards"
    return f"epoch {position['epoch']}, {shard} after line {position['line']}"


def _batches(stream: Iterator[list[int]], rows: int) -> Iterator[dict[str, torch.Tensor]]:
    while True:
        ids = torch.tensor([next(stream) for _ in range(rows)], dtype=torch.long)
        yield {"input_ids": ids, "labels": ids.clone()}


def _int32(values: list[int] | list[list[int]], width: int = 0) -> torch.Tensor:
    if not values:
        return torch.zeros((0, width) if width else (0,), dtype=torch.int32)
    return torch.tensor(values, dtype=torch.int32)


class _Blocks(Iterator[list[int]]):
    """An iterator over a TrainStream's blocks that can say where it is."""

    blocks: int  # blocks yielded since the start of the stream (epoch 0, first block)

    def state_dict(self) -> dict | None:
        raise NotImplementedError


class _LazyBlocks(_Blocks):
    """Starts the real iterator at the first block; until then its position is where it will
    start (None for a replay or a fresh start: a checkpoint then replays, which is exact)."""

    def __init__(self, start: Callable[[], _Blocks], position: dict | None):
        self._start, self._position, self._blocks = start, position, None

    def __next__(self) -> list[int]:
        if self._blocks is None:
            self._blocks = self._start()
        return next(self._blocks)

    def state_dict(self) -> dict | None:
        return self._position if self._blocks is None else self._blocks.state_dict()


class _InMemoryBlocks(_Blocks):
    def __init__(self, stream: TrainStream, position: dict | None):
        self.stream = stream
        docs = tokenize_stream(
            (t for url in stream.files for t in stream._texts(url)), stream.tokenizer
        )
        self.all_blocks = list(pack(docs, stream.max_length))
        if not self.all_blocks:
            raise stream._too_short()
        self.blocks, self.epoch, self.index = 0, 0, 0
        if position is not None:
            self.blocks = int(position["blocks"])
            self.epoch, self.index = int(position["epoch"]), int(position["index"])
        self._order = self._epoch_order()

    def _epoch_order(self) -> list[int]:
        order = list(range(len(self.all_blocks)))
        if self.stream.shuffle:
            self.stream._epoch_rng(self.epoch).shuffle(order)
        return order

    def __next__(self) -> list[int]:
        if self.index == len(self._order):
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._epoch_order()
        block = self.all_blocks[self._order[self.index]]
        self.index += 1
        self.blocks += 1
        return block

    def state_dict(self) -> dict:
        return {
            "version": POSITION_VERSION,
            "settings": self.stream.settings(),
            "blocks": self.blocks,
            "epoch": self.epoch,
            "index": self.index,
            "skipped_records": self.stream.skipped_records,
        }


class _StreamingBlocks(_Blocks):
    """Shards in a seeded order per epoch -> documents -> packed blocks -> shuffle buffer.

    Written as an explicit state machine (not nested generators) so that its whole position is
    a handful of fields. Per epoch: a fresh RNG from (seed, epoch) shuffles the shard order, then
    drives the reservoir shuffle (a full buffer emits a random slot and takes the new block in
    its place); at the end of the epoch the buffer is shuffled and drained. Tokens after the
    last full block carry over into the next epoch, so no token is dropped.
    """

    def __init__(self, stream: TrainStream, position: dict | None):
        self.stream = stream
        self.tokens: list[int] = []  # packed tokens not yet cut into a block
        self.blocks = 0
        self._docs: deque[tuple[int, list[int] | None]] = deque()  # read ahead, tokenized
        self._reader: Iterator[tuple[int, str | None]] | None = None
        if position is None:
            self._start_epoch(0)
            return
        self._start_epoch(int(position["epoch"]))
        self.blocks = int(position["blocks"])
        self.shard, self.line = int(position["shard"]), int(position["line"])
        self.tokens = position["tokens"].tolist()
        self.buffer = position["buffer"].tolist()
        self.draining = bool(position["draining"])
        self.epoch_blocks = int(position["epoch_blocks"])
        rng = position["rng"]
        self.rng.setstate((int(rng["version"]), tuple(rng["state"].tolist()), rng["gauss"]))
        stream.skipped_records = int(position["skipped_records"])

    def _start_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.rng = self.stream._epoch_rng(epoch)
        self.order = list(self.stream.files)
        if self.stream.shuffle:
            self.rng.shuffle(self.order)
        self.shard = 0  # index in self.order
        self.line = 0  # lines of that shard consumed (into self.tokens)
        self.buffer: list[list[int]] = []  # the shuffle buffer (reversed while draining)
        self.draining = False
        self.epoch_blocks = 0
        self._docs.clear()
        self._reader = None

    def _next_doc(self) -> list[int] | None:
        """The next document's ids in this epoch (None at its end); reads ahead in batches."""
        stream = self.stream
        while True:
            if self._docs:
                self.line, ids = self._docs.popleft()
                if ids is None:
                    stream.skipped_records += 1
                    continue
                return ids
            if self.shard == len(self.order):
                return None
            if self._reader is None:
                on_bad = (lambda e: None) if stream.skip_bad_records else None
                self._reader = read_records(self.order[self.shard], on_bad, self.line)
            records = list(itertools.islice(self._reader, TOKENIZE_BATCH))
            if not records:
                self._reader = None
                self.shard, self.line = self.shard + 1, 0
                continue
            texts = [text for _, text in records if text is not None]
            encoded = iter(stream.tokenizer.encode(texts) if texts else [])
            for line, text in records:
                self._docs.append((line, None if text is None else next(encoded)))

    def _next_packed(self) -> list[int] | None:
        size = self.stream.max_length
        while len(self.tokens) < size:
            ids = self._next_doc()
            if ids is None:
                return None
            self.tokens.extend(ids)
        block = self.tokens[:size]
        del self.tokens[:size]
        return block

    def _next_in_epoch(self) -> list[int] | None:
        if not self.stream.shuffle:
            return self._next_packed()
        size = self.stream.shuffle_buffer_size
        while not self.draining:
            item = self._next_packed()
            if item is None:
                self.rng.shuffle(self.buffer)
                self.buffer.reverse()  # drained from the end: pop() in the shuffled order
                self.draining = True
                break
            if len(self.buffer) < size:
                self.buffer.append(item)
                continue
            i = self.rng.randrange(size)
            block, self.buffer[i] = self.buffer[i], item
            return block
        return self.buffer.pop() if self.buffer else None

    def __next__(self) -> list[int]:
        while True:
            block = self._next_in_epoch()
            if block is not None:
                self.blocks += 1
                self.epoch_blocks += 1
                return block
            if self.epoch_blocks == 0:
                raise self.stream._too_short()
            self._start_epoch(self.epoch + 1)

    def state_dict(self) -> dict:
        version, state, gauss = self.rng.getstate()
        return {
            "version": POSITION_VERSION,
            "settings": self.stream.settings(),
            "blocks": self.blocks,
            "epoch": self.epoch,
            "shard": self.shard,
            "shard_file": self.order[self.shard] if self.shard < len(self.order) else None,
            "line": self.line,
            "tokens": _int32(self.tokens),
            "buffer": _int32(self.buffer, self.stream.max_length),
            "draining": self.draining,
            "epoch_blocks": self.epoch_blocks,
            "rng": {
                "version": version,
                "state": torch.tensor(state, dtype=torch.int64),
                "gauss": gauss,
            },
            "skipped_records": self.stream.skipped_records,
        }


@dataclass
class EvalSet:
    input_ids: torch.Tensor  # [rows, max_length]
    labels: torch.Tensor  # [rows, max_length], -100 where masked
    num_documents: int
    num_real_rows: int  # rows holding at least one real token

    @property
    def num_rows(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_target_tokens(self) -> int:
        """Tokens that contribute to the loss: labels shifted by one, unmasked."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())

    def batches(self, rows: int) -> Iterator[dict[str, torch.Tensor]]:
        for start in range(0, self.num_rows, rows):
            yield {
                "input_ids": self.input_ids[start : start + rows],
                "labels": self.labels[start : start + rows],
            }


def load_eval_set(
    url: str,
    tokenizer: Tokenizer,
    max_length: int,
    global_batch: int,
    pad_token_id: int,
    n_examples: int | None = None,
) -> EvalSet:
    texts = []
    for text in read_texts(url):
        if n_examples is not None and len(texts) >= n_examples:
            break
        texts.append(text)
    if not texts:
        raise DataError(f"{url}: validation set is empty")
    blocks = pack_with_remainder(tokenize_stream(iter(texts), tokenizer), max_length)
    rows = -(-len(blocks) // global_batch) * global_batch
    input_ids = torch.full((rows, max_length), pad_token_id, dtype=torch.long)
    labels = torch.full((rows, max_length), IGNORE_INDEX, dtype=torch.long)
    for i, block in enumerate(blocks):
        input_ids[i, : len(block)] = torch.tensor(block)
        labels[i, : len(block)] = torch.tensor(block)
    return EvalSet(input_ids, labels, num_documents=len(texts), num_real_rows=len(blocks))
