"""Tokenizer, packing, padding and the train stream on the shipped sample and on files made here."""

from __future__ import annotations

import gzip
import io
import itertools
import json
import shutil

import pytest
import sentencepiece as spm
import torch

from clm import data
from clm.config import CLM_DIR
from clm.tokenizer import MISTRAL_V1_SHA256, Tokenizer, find_tokenizer_file, mistral_v1_path

SAMPLE = str(CLM_DIR / "sample_data")


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer(mistral_v1_path())


def sample_texts(n=50):
    url = data.find_file(SAMPLE, data.VALIDATION_FILE)
    return list(itertools.islice(data.read_texts(url), n))


def test_tokenizer_is_mistral_v1_and_matches_sentencepiece(tokenizer):
    texts = sample_texts() + ["Hello  world.\n\tTabs, naïve café — 13 dogs!", ""]
    reference = spm.SentencePieceProcessor(model_file=str(mistral_v1_path()))
    assert tokenizer.vocab_size == 32000
    assert tokenizer.encode(texts) == reference.encode(texts)
    ids = tokenizer.encode(["The quick brown fox."])[0]
    assert ids[0] != reference.bos_id() and ids[-1] != reference.eos_id()  # no BOS/EOS


def test_tokenizer_hash_mismatch_names_the_file(tmp_path):
    fake = tmp_path / "tokenizer.model"
    fake.write_bytes(mistral_v1_path().read_bytes()[:-1] + b"x")
    with pytest.raises(ValueError, match=f"{fake}: sha256 .* != dataset.tokenizer_sha256"):
        Tokenizer(fake, MISTRAL_V1_SHA256)


def test_tokenizer_file_from_name_or_path_directory(tmp_path):
    shutil.copy(mistral_v1_path(), tmp_path / "tokenizer.model")
    assert find_tokenizer_file(str(tmp_path)) == tmp_path / "tokenizer.model"
    assert find_tokenizer_file("mistralai/Mixtral-8x22B-v0.1") == mistral_v1_path()


def test_pack_keeps_every_token_in_order():
    docs = [[1, 2, 3], [4], [5, 6, 7, 8, 9], [10, 11]]
    leftover: list[int] = []
    blocks = list(data.pack(iter(docs), 4, leftover))
    assert blocks == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert leftover == [9, 10, 11]
    assert data.pack_with_remainder(iter(docs), 4)[-1] == [9, 10, 11]


def test_eval_set_padding_and_masking(tokenizer):
    eval_set = data.load_eval_set(
        data.find_file(SAMPLE, data.VALIDATION_FILE), tokenizer, 128, 8, 2, n_examples=30
    )
    ids = [t for doc in tokenizer.encode(sample_texts(30)) for t in doc]
    assert eval_set.num_documents == 30
    assert eval_set.num_rows % 8 == 0 and eval_set.num_rows >= eval_set.num_real_rows
    assert eval_set.num_real_rows == -(-len(ids) // 128)
    assert (eval_set.input_ids >= 0).all()  # inputs are never -100
    real = eval_set.labels != data.IGNORE_INDEX
    assert eval_set.input_ids[real].tolist() == ids  # every token once, in order
    assert (eval_set.input_ids[~real] == 2).all()  # padding uses pad_token_id
    assert not real[eval_set.num_real_rows :].any()  # padding rows are fully masked
    assert eval_set.num_target_tokens == len(ids) - eval_set.num_real_rows


def test_train_stream_is_deterministic_full_and_resumable(tokenizer):
    files = data.train_files(SAMPLE, 768, 772)
    assert [f.rsplit("/", 1)[1] for f in files] == [
        f"c4-train.{i:05d}-of-01024.json.gz" for i in range(768, 772)
    ]

    def stream(seed, **kw):
        return data.TrainStream(files, tokenizer, 64, seed, shuffle_buffer_size=16, **kw)

    first = list(itertools.islice(stream(1).blocks(), 40))
    assert first == list(itertools.islice(stream(1).blocks(), 40))
    assert first != list(itertools.islice(stream(2).blocks(), 40))
    assert all(len(b) == 64 for b in first)
    assert list(itertools.islice(stream(1).blocks(skip=25), 15)) == first[25:]
    batch = next(stream(1).batches(rows=4))
    assert batch["input_ids"].shape == (4, 64) and torch.equal(batch["labels"], batch["input_ids"])
    unshuffled = list(itertools.islice(stream(1, shuffle=False).blocks(), 3))
    first_doc = tokenizer.encode([next(data.read_texts(files[0]))])[0]
    assert [t for b in unshuffled for t in b][: len(first_doc)] == first_doc[: 3 * 64]


def test_train_stream_wraps_around_epochs(tmp_path, tokenizer):
    shard = tmp_path / data.train_shard_name(768)
    shard.write_text(json.dumps({"text": "one two three four five six seven eight"}) + "\n")
    [doc] = tokenizer.encode(["one two three four five six seven eight"])
    for streaming in (True, False):
        stream = data.TrainStream([str(shard)], tokenizer, 4, 0, streaming=streaming)
        blocks = list(itertools.islice(stream.blocks(), 10))  # far more than one epoch
        assert len(blocks) == 10 and all(len(b) == 4 for b in blocks)
        # unshuffled: the one document, epoch after epoch, packed without a gap or a repeat
        plain = data.TrainStream([str(shard)], tokenizer, 4, 0, streaming=streaming, shuffle=False)
        tokens = [t for b in itertools.islice(plain.blocks(), 10) for t in b]
        assert tokens == (doc * (40 // len(doc) + 1))[:40], streaming
        # shuffled: the same blocks (8 tokens, two whole blocks per epoch), reordered
        assert len(doc) == 8
        assert sorted(blocks) == sorted(tokens[i : i + 4] for i in range(0, 40, 4)), streaming


def write_gz(path, lines):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"text": "fine"}', "{not json"], r":2: not a JSON line"),
        (['{"text": "fine"}', '{"url": "x"}'], r":2: record has no string 'text' field"),
    ],
)
def test_bad_records_name_file_and_line(tmp_path, lines, message):
    shard = tmp_path / "c4-train.00768-of-01024.json.gz"
    write_gz(shard, lines)
    with pytest.raises(data.DataError, match=str(shard) + message):
        list(data.read_texts(str(shard)))


def test_truncated_gzip_names_the_file(tmp_path):
    shard = tmp_path / "c4-train.00768-of-01024.json.gz"
    write_gz(shard, [json.dumps({"text": "word " * 2000})] * 20)
    shard.write_bytes(shard.read_bytes()[:300])
    with pytest.raises(data.DataError, match=f"{shard}: unreadable"):
        list(data.read_texts(str(shard)))


def test_missing_shard_and_empty_validation(tmp_path, tokenizer):
    with pytest.raises(data.DataError, match="c4-train.00772-of-01024.json: missing data file"):
        data.train_files(SAMPLE, 768, 773)
    empty = tmp_path / data.VALIDATION_FILE
    empty.write_text("")
    with pytest.raises(data.DataError, match="validation set is empty"):
        data.load_eval_set(str(empty), tokenizer, 16, 2, 2)


def small_shards(directory, docs_per_shard=(20, 14, 26), bad_line=None):
    """Three shards of real sample text, with blank lines (and optionally one bad record)."""
    texts = iter(sample_texts(sum(docs_per_shard)))
    files = []
    for i, count in enumerate(docs_per_shard):
        lines = []
        for j in range(count):
            lines.append(json.dumps({"text": next(texts)}))
            if j % 7 == 3:
                lines.append("")  # blank lines count as lines of the file, not as records
            if (i, j) == bad_line:
                lines.append("{not json")
        path = directory / (data.train_shard_name(768 + i) + ".gz")
        write_gz(path, lines)
        files.append(str(path))
    return files


def saved(position):
    """The position as a checkpoint holds it: torch.save, then torch.load(weights_only=True)."""
    buffer = io.BytesIO()
    torch.save(position, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("streaming", [True, False])
def test_saved_position_continues_with_exactly_the_remaining_blocks(tmp_path, tokenizer, streaming):
    files = small_shards(tmp_path, bad_line=(1, 5))

    def stream():
        return data.TrainStream(
            files, tokenizer, 64, 7, streaming=streaming, shuffle_buffer_size=16,
            skip_bad_records=True,
        )  # fmt: skip

    reference = stream()
    blocks = reference.blocks()
    positions, expected = [None], []  # positions[k]: after k blocks (None: not started)
    for _ in range(600):  # about three epochs
        expected.append(next(blocks))
        positions.append(saved(blocks.state_dict()))
    if streaming:  # stop points: start, mid shard, each shard boundary, draining, each epoch
        keys = [None] + [(p["epoch"], p["shard"], p["draining"]) for p in positions[1:600]]
        stops = sorted({keys.index(key) for key in keys} | {5, 40})
        assert {(0, 0, False), (0, 1, False), (0, 2, False), (0, 3, True), (1, 0, False)} <= set(
            keys[k] for k in stops
        )
        assert any(
            k and len(positions[k]["buffer"]) == 16 and len(positions[k]["tokens"]) for k in stops
        )
    else:
        keys = [None] + [p["epoch"] for p in positions[1:600]]
        stops = sorted({keys.index(key) for key in keys} | {5, keys.index(1) - 1})
        assert len(stops) >= 4
    for k in stops:
        resumed = stream()
        rest = resumed.blocks(skip=k, position=positions[k])
        assert list(itertools.islice(rest, 600 - k)) == expected[k:], k
        assert resumed.skipped_records == reference.skipped_records, k
    # the bad record: once per epoch streaming, once in all in memory (read once)
    assert reference.skipped_records > 1 if streaming else reference.skipped_records == 1


class CountingTokenizer(Tokenizer):
    def encode(self, texts):
        self.texts = getattr(self, "texts", []) + list(texts)
        return super().encode(texts)


def test_resume_from_a_position_reads_nothing_it_consumed(tmp_path, tokenizer):
    """The records consumed before the position are made unparsable once it is saved: the replay
    fallback fails on them; the position skips them unparsed and tokenizes only what follows."""
    files = small_shards(tmp_path, docs_per_shard=(60, 60, 60))

    def stream(tok=tokenizer):
        return data.TrainStream(files, tok, 64, 7, shuffle_buffer_size=16)

    blocks = stream().blocks()
    for _ in range(2000):
        next(blocks)
        position = saved(blocks.state_dict())
        if position["shard"] == 1 and position["line"] > 10:
            break
    k = position["blocks"]
    expected = list(itertools.islice(blocks, 30))
    consumed = position["line"]
    with gzip.open(position["shard_file"], "rt", encoding="utf-8") as f:
        lines = f.read().splitlines()
    following = next(json.loads(x)["text"] for x in lines[consumed:] if x.strip())
    lines[:consumed] = ["{consumed"] * consumed
    write_gz(position["shard_file"], lines)
    for other in files:  # the shard consumed before it (and the one after, not needed here)
        if other != position["shard_file"]:
            write_gz(other, ["{consumed"] * 80)

    with pytest.raises(data.DataError, match="not a JSON line"):
        next(stream().blocks(skip=k))  # a replay reads (and would re-tokenize) them again
    counting = CountingTokenizer(tokenizer.path)
    resumed = stream(counting).blocks(skip=k, position=position)
    assert list(itertools.islice(resumed, 30)) == expected
    assert counting.texts[0] == following  # the first record after the position, then on
    assert len(counting.texts) <= data.TOKENIZE_BATCH  # one read-ahead batch, no replay


def test_position_with_other_settings_replays_and_a_changed_file_is_named(tmp_path, tokenizer):
    files = small_shards(tmp_path)
    blocks = data.TrainStream(files, tokenizer, 64, 7, shuffle_buffer_size=16).blocks()
    expected = [next(blocks) for _ in range(50)]
    position = saved(blocks.state_dict())

    other = data.TrainStream(files, tokenizer, 64, 7, shuffle_buffer_size=8)
    with pytest.warns(
        UserWarning, match="saved with shuffle_buffer_size=16, this run has shuffle_buffer_size=8"
    ):
        rest = other.blocks(skip=20, position=position)
    assert next(rest) == list(itertools.islice(other.blocks(), 21))[20]
    same = data.TrainStream(files, tokenizer, 64, 7, shuffle_buffer_size=16)
    with pytest.warns(UserWarning, match="after 50 blocks, the checkpoint's step after 20"):
        assert next(same.blocks(skip=20, position=position)) == expected[20]

    write_gz(position["shard_file"], ['{"text": "one short record"}'])
    with pytest.raises(data.DataError, match="fewer than the saved data position"):
        list(itertools.islice(same.blocks(skip=50, position=position), 50))
