"""C4 json(.gz) shards -> Megatron-core indexed datasets (.bin/.idx), with our tokenizer.

Megatron-Bridge trains on token files in Megatron-core's indexed format, not on json shards.
Megatron's own `tools/preprocess_data.py` needs Megatron installed (the NeMo container); this
writer is plain numpy, so the data can be prepared on any CPU machine, in parallel with the
image build, and is tested here against the shipped sample.

The format, as `megatron/core/datasets/indexed_dataset.py` (`_IndexWriter`, `_IndexReader`,
`DType`) writes and reads it:

    .bin  every document's token ids back to back, C order, in `dtype`: uint16 when the
          vocabulary has fewer than 65500 entries (`DType.optimal_dtype`), else int32
    .idx  b"MMIDIDX\\x00\\x00" | <Q version = 1 | <B dtype code | <Q sequence count
          | <Q document count | int32[sequences] lengths | int64[sequences] byte offsets into
          .bin | int64[documents] document indices (0, then the sequence that ends each
          document)

One document is one sequence (no sentence splitting), so the document indices are 0..N.
Tokens are the reference's: sentencepiece without BOS/EOS (`clm.tokenizer`), and no EOD token
between documents unless `--append-eod`, so Megatron's GPTDataset (with `eod_mask_loss`,
`reset_position_ids` and `reset_attention_mask` off) packs the documents back to back exactly
as `clm.data` does. Empty documents are skipped: they hold no tokens either way.

Outputs in `--output-dir` (names follow preprocess_data's `<prefix>_text_document`):

    c4-train.00768-of-01024_text_document.{bin,idx}   one per shard of dataset.train_shards
    c4-validation_24567exp_text_document.{bin,idx}      the first n_eval_examples documents
    <prefix>.json                                       what was written: documents, tokens,
                                                        source, tokenizer sha256, limit

A prefix whose sidecar matches (same source, tokenizer and limit) is skipped, so an
interrupted run continues where it stopped. Files appear atomically (written to `*.tmp`,
then renamed).

    python -m clm.nemo.prepare_data --output-dir /data/c4-megatron [--workers 16] \\
        +experiment=gbs256_gpu dataset.train_dataset_path=/data/c4 dataset.eval_dataset_path=/data/c4
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

INDEX_HEADER = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
# megatron.core.datasets.indexed_dataset.DType: numpy dtype <-> the code stored in the .idx
DTYPE_CODES = {
    np.uint8: 1,
    np.int8: 2,
    np.int16: 3,
    np.int32: 4,
    np.int64: 5,
    np.float64: 6,
    np.float32: 7,
    np.uint16: 8,
}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
SUFFIX = "_text_document"
VALIDATION_PREFIX = "c4-validation_24567exp" + SUFFIX
TOKENIZE_BATCH = 64


def optimal_dtype(vocab_size: int) -> type[np.number]:
    """Megatron's `DType.optimal_dtype`: uint16 below 65500 entries, else int32."""
    return np.uint16 if vocab_size < 65500 else np.int32


def train_prefix(shard_index: int, total: int = 1024) -> str:
    return f"c4-train.{shard_index:05d}-of-{total:05d}{SUFFIX}"


class IndexedDatasetWriter:
    """Writes `<prefix>.bin` and `<prefix>.idx`, one document per `add_document` call.

    Both files are written under `.tmp` names and renamed by `close()`, so a reader never sees
    a half-written dataset; leaving the `with` block on an exception removes them.
    """

    def __init__(self, prefix: str | Path, dtype: type[np.number]):
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype).type
        if self.dtype not in DTYPE_CODES:
            raise ValueError(f"dtype {dtype}: not one Megatron's indexed format can store")
        self._bin_tmp = self.prefix.with_name(self.prefix.name + ".bin.tmp")
        self._bin = open(self._bin_tmp, "wb")
        self.lengths: list[int] = []
        self._max = np.iinfo(self.dtype).max if np.issubdtype(self.dtype, np.integer) else None

    def add_document(self, ids: Iterable[int]) -> None:
        array = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids)
        if array.size == 0:
            raise ValueError("empty document: Megatron's GPTDataset needs at least one token")
        if self._max is not None and (array.min() < 0 or array.max() > self._max):
            raise ValueError(f"token id out of range for {np.dtype(self.dtype).name}")
        self._bin.write(array.astype(self.dtype).tobytes(order="C"))
        self.lengths.append(int(array.size))

    def close(self) -> None:
        """Write the index and move both files into place."""
        self._bin.close()
        lengths = np.asarray(self.lengths, dtype=np.int32)
        itemsize = np.dtype(self.dtype).itemsize
        pointers = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths) > 1:
            pointers[1:] = np.cumsum(lengths[:-1].astype(np.int64)) * itemsize
        documents = np.arange(len(lengths) + 1, dtype=np.int64)
        idx_tmp = self.prefix.with_name(self.prefix.name + ".idx.tmp")
        with open(idx_tmp, "wb") as f:
            f.write(INDEX_HEADER)
            f.write(struct.pack("<Q", INDEX_VERSION))
            f.write(struct.pack("<B", DTYPE_CODES[self.dtype]))
            f.write(struct.pack("<Q", len(lengths)))
            f.write(struct.pack("<Q", len(documents)))
            f.write(lengths.tobytes(order="C"))
            f.write(pointers.tobytes(order="C"))
            f.write(documents.tobytes(order="C"))
        # .bin first: a present .idx then always has its .bin
        os.replace(self._bin_tmp, self.prefix.with_name(self.prefix.name + ".bin"))
        os.replace(idx_tmp, self.prefix.with_name(self.prefix.name + ".idx"))

    def abort(self) -> None:
        self._bin.close()
        self._bin_tmp.unlink(missing_ok=True)

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


@dataclass
class Index:
    """The arrays of one `.idx` file."""

    dtype: type[np.number]
    sequence_lengths: np.ndarray  # int32 [sequences]
    sequence_pointers: np.ndarray  # int64 [sequences], byte offsets into .bin
    document_indices: np.ndarray  # int64 [documents + 1]

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))


def read_index(prefix: str | Path) -> Index:
    """Parse `<prefix>.idx`; ValueError naming the file when it is not a version-1 index."""
    path = Path(str(prefix) + ".idx")
    data = path.read_bytes()
    if data[:9] != INDEX_HEADER:
        raise ValueError(f"{path}: not a Megatron indexed dataset (bad header)")
    (version,) = struct.unpack_from("<Q", data, 9)
    (code,) = struct.unpack_from("<B", data, 17)
    sequences, documents = struct.unpack_from("<QQ", data, 18)
    if version != INDEX_VERSION or code not in CODE_DTYPES:
        raise ValueError(f"{path}: unsupported version {version} or dtype code {code}")
    offset = 34
    lengths = np.frombuffer(data, np.int32, sequences, offset)
    offset += lengths.nbytes
    pointers = np.frombuffer(data, np.int64, sequences, offset)
    offset += pointers.nbytes
    docs = np.frombuffer(data, np.int64, documents, offset)
    return Index(CODE_DTYPES[code], lengths, pointers, docs)


def iter_documents(prefix: str | Path) -> Iterator[np.ndarray]:
    """Each document's token ids, read through a memory map of `<prefix>.bin`."""
    index = read_index(prefix)
    tokens = np.memmap(str(prefix) + ".bin", dtype=index.dtype, mode="r")
    itemsize = np.dtype(index.dtype).itemsize
    for d in range(index.num_documents):
        first, last = index.document_indices[d], index.document_indices[d + 1]
        for s in range(first, last):
            start = index.sequence_pointers[s] // itemsize
            yield np.array(tokens[start : start + index.sequence_lengths[s]])


# ---- C4 shards -> indexed datasets ----------------------------------------------------------
@dataclass(frozen=True)
class Job:
    """One source file to one prefix; picklable for worker processes."""

    source: str
    prefix: str  # absolute path without .bin/.idx
    tokenizer_file: str
    tokenizer_sha256: str | None
    limit: int | None  # first n documents only (the eval subset); None: all
    append_eod: bool
    skip_bad_records: bool

    def sidecar(self) -> Path:
        return Path(self.prefix + ".json")

    def identity(self) -> dict:
        return {
            "source": self.source,
            "tokenizer_sha256": self.tokenizer_sha256,
            "limit": self.limit,
            "append_eod": self.append_eod,
        }

    def done(self) -> bool:
        try:
            meta = json.loads(self.sidecar().read_text())
        except (OSError, ValueError):
            return False
        same = all(meta.get(k) == v for k, v in self.identity().items())
        return same and all(Path(self.prefix + ext).is_file() for ext in (".bin", ".idx"))


def run_job(job: Job) -> dict:
    """Tokenize one file into one indexed dataset and write its sidecar; returns the sidecar."""
    from clm import data as data_lib
    from clm.tokenizer import Tokenizer

    tokenizer = Tokenizer(Path(job.tokenizer_file), job.tokenizer_sha256)
    skipped = empty = 0

    def on_bad_record(_error) -> None:
        nonlocal skipped
        skipped += 1

    texts = data_lib.read_texts(job.source, on_bad_record if job.skip_bad_records else None)
    if job.limit is not None:
        texts = _first(texts, job.limit)
    Path(job.prefix).parent.mkdir(parents=True, exist_ok=True)
    with IndexedDatasetWriter(job.prefix, optimal_dtype(tokenizer.vocab_size)) as writer:
        read = 0
        for ids in data_lib.tokenize_stream(texts, tokenizer):
            read += 1
            if job.append_eod:
                ids = ids + [tokenizer.eos_id]
            if not ids:
                empty += 1
                continue
            writer.add_document(ids)
        if not writer.lengths:
            raise ValueError(f"{job.source}: no non-empty documents")
    meta = {
        **job.identity(),
        "documents": len(writer.lengths),
        "tokens": int(sum(writer.lengths)),
        "documents_read": read,
        "empty_documents_skipped": empty,
        "bad_records_skipped": skipped,
        "dtype": np.dtype(writer.dtype).name,
    }
    tmp = job.sidecar().with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, job.sidecar())
    return meta


def _first(items: Iterator[str], n: int) -> Iterator[str]:
    for i, item in enumerate(items):
        if i >= n:
            return
        yield item


def jobs_for(cfg, output_dir: str | Path, append_eod: bool = False) -> list[Job]:
    """The train shards of `dataset.train_shards` and the eval subset, as jobs."""
    from clm import data as data_lib
    from clm.tokenizer import find_tokenizer_file

    output_dir = Path(output_dir).resolve()
    tokenizer_file = str(find_tokenizer_file(cfg.model.name_or_path))
    sha = cfg.dataset.tokenizer_sha256
    skip_bad = bool(cfg.dataset.get("skip_bad_records", False))
    first, last = cfg.dataset.train_shards
    jobs = [
        Job(
            data_lib.find_file(cfg.dataset.train_dataset_path, data_lib.train_shard_name(i)),
            str(output_dir / train_prefix(i)),
            tokenizer_file,
            sha,
            None,
            append_eod,
            skip_bad,
        )
        for i in range(first, last)
    ]
    n_eval = cfg.n_eval_examples
    jobs.append(
        Job(
            data_lib.find_file(cfg.dataset.eval_dataset_path, data_lib.VALIDATION_FILE),
            str(output_dir / VALIDATION_PREFIX),
            tokenizer_file,
            sha,
            None if n_eval is None else int(n_eval),
            append_eod,
            False,  # the eval set is read strictly, as clm.data.load_eval_set does
        )
    )
    return jobs


def prepare(jobs: list[Job], workers: int = 1, log=print) -> list[dict]:
    """Run the jobs not already done, `workers` at a time; returns every job's sidecar."""
    todo = [job for job in jobs if not job.done()]
    for job in jobs:
        if job not in todo:
            log(f"{job.prefix}: up to date")
    if workers <= 1 or len(todo) <= 1:
        for job in todo:
            meta = run_job(job)
            log(f"{job.prefix}: {meta['documents']} documents, {meta['tokens']} tokens")
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for job, meta in zip(todo, pool.map(run_job, todo), strict=True):
                log(f"{job.prefix}: {meta['documents']} documents, {meta['tokens']} tokens")
    return [json.loads(job.sidecar().read_text()) for job in jobs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m clm.nemo.prepare_data",
        description="Tokenize the C4 shards of a Hydra config into Megatron indexed datasets.",
        epilog="Remaining arguments are Hydra overrides, as for run_clm.py.",
    )
    parser.add_argument("--output-dir", required=True, type=Path)
    parser.add_argument("--workers", type=int, default=1, help="files tokenized in parallel")
    parser.add_argument(
        "--append-eod",
        action="store_true",
        help="end each document with the EOS id (the reference adds none)",
    )
    args, overrides = parser.parse_known_args(argv)
    from clm import config as config_lib
    from clm.nemo import recipe

    try:
        cfg = recipe.compose(overrides)
        jobs = jobs_for(cfg, args.output_dir, args.append_eod)
        prepare(jobs, args.workers)
    except (ValueError, FileNotFoundError, config_lib.ConfigError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
