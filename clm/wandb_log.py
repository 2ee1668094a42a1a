"""Weights & Biases: the records of metrics.jsonl, at their steps, also in a W&B run.

Only `wandb.enabled=true` turns it on (clm/config/config.yaml says why). The main process then
starts one W&B run, with the resolved config (secrets masked, as in config.yaml) as its config,
and `MetricsWriter` hands it every record it appends to metrics.jsonl, train and eval, with the
record's step: nothing is read from the device for W&B. W&B keeps one row per step, so a step's
train record and eval record become one row.

WANDB_MODE and the other standard WANDB_* variables apply as W&B defines them; the config's
`wandb.*` keys take WANDB_PROJECT, WANDB_ENTITY and WANDB_NAME as their defaults. When
WANDB_DIR and WANDB_CACHE_DIR are not set, everything W&B writes stays in the run directory:
the run in `${run_dir}/wandb/offline-run-*` (or `run-*` online), wandb's own logs in
`wandb/cache`, the two temporary directories it makes at import in `wandb/tmp`. Only its
services' sockets live in $TMPDIR, while the run is alive (a Unix socket path is limited to
108 bytes, which a run directory may exceed).

Resume: the W&B run id is saved in each checkpoint's trainer state. A run that resumes from its
own checkpoint continues that W&B run (`resume="allow"`, the same id); a run started from
`checkpoint_manager_path` is a new W&B run. On start the W&B run receives the records of
metrics.jsonl it does not hold yet, and afterwards only steps after the last one it holds. What
it holds is what the earlier segments of this run id in `wandb/` recorded (their transaction
logs, read by `read_segment`) or, online, what the server reports (`run.starting_step`). So
no step reaches W&B twice, and a segment whose tail a hard kill lost (wandb-core buffers up to
32 KiB of its log) is filled in from metrics.jsonl. Steps after the checkpoint that a killed
attempt had logged keep that attempt's values in W&B, while metrics.jsonl holds the resumed
run's (the same losses on the CPU; different perf/* timings). Offline, each attempt writes its
own `offline-run-<time>-<id>` directory with the same id, and wandb 0.31 marks the later ones as
resuming (`resume` in their run record, checked by the tests). `wandb sync <run_dir>/wandb` then
uploads them in start order into one W&B run: so wandb's own sync code and tests say; no W&B
server was reachable here to see it.

Failure: wandb missing, failing to start (no network, a bad key) or failing to log warns once on
stderr; the run goes on with metrics.jsonl and TensorBoard. Start and finish are bounded:
init_timeout 30 s and finish_timeout 120 s unless WANDB_INIT_TIMEOUT / WANDB_FINISH_TIMEOUT say
otherwise (data not uploaded by then stays in the run's `.wandb` file for `wandb sync`).

`python -m clm.wandb_log RUN_DIR` checks that the W&B records in `RUN_DIR/wandb` hold the same
history as `RUN_DIR/metrics.jsonl` (exit 0) or prints where they differ (exit 1).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import string
import struct
import sys
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from clm import config as config_lib

# settings W&B waits on, and the bounds used when the user has not set them
TIMEOUTS = {
    "WANDB_INIT_TIMEOUT": ("init_timeout", 30.0),
    "WANDB_FINISH_TIMEOUT": ("finish_timeout", 120.0),
}


def enabled(cfg: DictConfig) -> bool:
    node = cfg.get("wandb")
    return bool(node is not None and node.get("enabled"))


def new_run_id() -> str:
    """An id like W&B's own (8 characters, lowercase letters and digits)."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


class WandbRun:
    """The W&B side of MetricsWriter (main process only). Never raises: a failure warns once
    and turns it into a no-op."""

    def __init__(self, cfg: DictConfig, run_dir: Path, run_id: str | None, resumed: bool):
        self.id = run_id or os.environ.get("WANDB_RUN_ID") or new_run_id()
        self.run_dir = Path(run_dir)
        self.held = -1  # the last step the W&B run already holds: later steps only
        self._run = None
        self._warned = False
        if os.environ.get("WANDB_MODE", "").strip().lower() == "disabled":
            return  # W&B's own off switch; then not even imported
        try:
            self._start(cfg, resumed)
        except Exception as e:  # noqa: BLE001 - whatever wandb raises, training goes on
            self._warn(f"could not start it ({_reason(e)})")
            self.finish(1)

    @property
    def active(self) -> bool:
        return self._run is not None

    def _start(self, cfg: DictConfig, resumed: bool) -> None:
        root = Path(os.environ.get("WANDB_DIR") or self.run_dir)
        local = root / "wandb"
        local.mkdir(parents=True, exist_ok=True)
        # wandb-core writes its logs under the cache directory (default ~/.cache/wandb)
        os.environ.setdefault("WANDB_CACHE_DIR", str(local / "cache"))
        wandb = _import_wandb(local / "tmp")
        settings = {name: value for var, (name, value) in TIMEOUTS.items() if var not in os.environ}
        # W&B records the command line with the run: mask secrets there as in the config
        argv, sys.argv = sys.argv, redacted_argv(sys.argv)
        try:
            run = self._init(wandb, root, cfg, resumed, settings)
        finally:
            sys.argv = argv
        if run.settings.mode == "disabled":
            return  # `wandb disabled` in a settings file: W&B's own choice, no warning
        self._run = run
        # what the W&B run holds already: earlier segments of this id here, or the server's count
        current = Path(run.settings.sync_file).resolve()
        for segment in segments(local, self.id):
            if segment.path.resolve() != current and segment.history:
                self.held = max(self.held, max(segment.history))
        self.held = max(self.held, int(run.starting_step or 0) - 1)
        metrics = self.run_dir / "metrics.jsonl"
        if metrics.exists():  # the records the W&B run lacks (all of them, unless resumed)
            for step, row in merged_records(metrics).items():
                if step > self.held:
                    self._run.log(row, step=step)

    def _init(self, wandb, root: Path, cfg: DictConfig, resumed: bool, settings: dict):
        node = cfg.wandb
        return wandb.init(
            dir=str(root),
            project=_text(node.project),
            entity=_text(node.entity),
            name=_text(node.name),
            tags=[str(t) for t in node.tags or ()] or None,  # empty: WANDB_TAGS, read by W&B
            config=config_lib.redacted(cfg),
            id=self.id,
            resume="allow" if resumed else None,
            settings=wandb.Settings(**settings),
        )

    def log(self, step: int, values: dict) -> None:
        """One record of metrics.jsonl (plain values); steps the W&B run holds are skipped."""
        if self._run is None or step <= self.held:
            return
        try:
            self._run.log({k: _number(v) for k, v in values.items()}, step=step)
        except Exception as e:  # noqa: BLE001
            self._run = None
            self._warn(f"logging step {step} failed ({_reason(e)}); no more W&B logging")

    def finish(self, exit_code: int = 0) -> None:
        if self._run is None:
            return
        run, self._run = self._run, None
        try:
            run.finish(exit_code=exit_code)
        except Exception as e:  # noqa: BLE001
            self._warn(f"finishing the run failed ({_reason(e)})", "metrics.jsonl is complete")

    def _warn(self, what: str, then: str = "training goes on with metrics.jsonl and TensorBoard"):
        if self._warned:
            return
        self._warned = True
        print(f"warning: W&B: {what}; {then}", file=sys.stderr, flush=True)


def _import_wandb(tmp: Path):
    """Import wandb with its two import-time temporary directories (media and artifact staging)
    under `tmp` instead of $TMPDIR: removed at a normal exit either way, left behind by a kill."""
    tmp.mkdir(parents=True, exist_ok=True)
    previous = tempfile.tempdir
    tempfile.tempdir = str(tmp)
    try:
        import wandb
    finally:
        tempfile.tempdir = previous
    return wandb


def redacted_argv(argv: list[str]) -> list[str]:
    """The command line with the values of secret-looking overrides (`+hf_token=...`) masked,
    by the rule `clm.config.redacted` applies to the config."""
    masked = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        name = key.lstrip("+~").rsplit(".", 1)[-1]
        secret = sep and value and config_lib.SECRET_KEY.search(name)
        masked.append(f"{key}=***" if secret else arg)
    return masked


def _text(value) -> str | None:
    return None if value is None else str(value)


def _reason(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else ""
    return f"{type(error).__name__}: {text[:300]}" if text else type(error).__name__


# ---- reading W&B's records back -------------------------------------------------------------
# A run's `.wandb` file is a LevelDB-style log: a 7-byte header (":W&B", 0xBEE1, version 0),
# then 32 KiB blocks of records, each with a 7-byte header (CRC-32 of type and data, length,
# type: full, first, middle, last); every record is a serialized wandb.proto Record.
HEADER = b":W&B" + struct.pack("<HB", 0xBEE1, 0)
BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def transaction_records(path: Path):
    """The serialized records of a `.wandb` file, up to its last complete one."""
    data = Path(path).read_bytes()
    if not HEADER.startswith(data[: len(HEADER)]):  # empty or cut short: nothing was recorded
        raise ValueError(f"{path}: not a W&B transaction log")
    pos, pending = len(HEADER), None
    while True:
        room = BLOCK - pos % BLOCK
        if room < 7:  # a block's tail too short for a header is padding
            pos += room
            continue
        if pos + 7 > len(data):
            return
        crc, length, kind = struct.unpack_from("<IHB", data, pos)
        chunk = data[pos + 7 : pos + 7 + length]
        if kind not in (FULL, FIRST, MIDDLE, LAST) or len(chunk) < length:
            return  # the end of what the writer flushed
        if zlib.crc32(chunk, zlib.crc32(bytes([kind]))) != crc:
            return
        pos += 7 + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif pending is not None:
            pending += chunk
            if kind == LAST:
                yield pending
                pending = None


@dataclass
class Segment:
    """What one W&B process (one attempt of a run) recorded in its `.wandb` file."""

    path: Path
    run_id: str = ""
    project: str = ""
    entity: str = ""
    name: str = ""
    tags: list[str] = field(default_factory=list)
    resume: bool = False  # the run record says this attempt resumes an earlier one
    start_time: float = 0.0
    config: dict = field(default_factory=dict)
    history: dict[int, dict] = field(default_factory=dict)  # step -> {key: value}
    exit_code: int | None = None


def read_segment(path: Path) -> Segment:
    """Run record, config, history rows and exit code of a `.wandb` file."""
    from google.protobuf.message import DecodeError
    from wandb.proto import wandb_internal_pb2

    segment = Segment(Path(path))
    for raw in transaction_records(path):
        record = wandb_internal_pb2.Record()
        try:
            record.ParseFromString(raw)
        except DecodeError:  # cannot happen past the CRC check unless the format changed
            break
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            segment.run_id, segment.project, segment.entity = run.run_id, run.project, run.entity
            segment.name, segment.tags = run.display_name, list(run.tags)
            segment.resume = bool(getattr(run, "resume", False))
            segment.start_time = run.start_time.seconds + run.start_time.nanos / 1e9
            segment.config = {u.key: json.loads(u.value_json) for u in run.config.update}
        elif kind == "history":
            row = {}
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            step = int(row.get("_step", record.history.step.num))
            segment.history[step] = {k: v for k, v in row.items() if not k.startswith("_")}
        elif kind == "exit":
            segment.exit_code = record.exit.exit_code
    return segment


def segments(wandb_dir: Path, run_id: str | None = None) -> list[Segment]:
    """The segments in a `wandb/` directory (of one run id, if given), oldest first."""
    found = []
    for path in sorted(Path(wandb_dir).glob("*/run-*.wandb")):
        if path.parent.is_symlink():  # latest-run
            continue
        if run_id is not None and path.name != f"run-{run_id}.wandb":
            continue
        found.append(read_segment(path))
    return sorted(found, key=lambda s: (s.start_time, s.path.name))


def merged_records(metrics: Path) -> dict[int, dict]:
    """metrics.jsonl as W&B holds it: one row per step, that step's records merged."""
    rows: dict[int, dict] = {}
    with open(metrics, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                step = record.pop("step")
                rows.setdefault(step, {}).update({k: _number(v) for k, v in record.items()})
    return rows


def _number(value):
    """metrics.jsonl writes non-finite floats as text; W&B holds them as numbers."""
    if isinstance(value, str) and value.lower() in ("nan", "inf", "-inf", "infinity", "-infinity"):
        return float(value)
    return value


def history(wandb_dir: Path, run_id: str | None = None) -> tuple[dict[int, dict], list[int]]:
    """The rows of a run's segments in start order, and the steps more than one segment holds
    (`wandb sync` would renumber those; `WandbRun` never writes any)."""
    rows: dict[int, dict] = {}
    repeated = []
    for segment in segments(wandb_dir, run_id):
        for step, row in segment.history.items():
            if step in rows:
                repeated.append(step)
            rows.setdefault(step, {}).update(row)
    return dict(sorted(rows.items())), repeated


def differences(run_dir: Path, run_id: str | None = None) -> list[str]:
    """Where the W&B history in `run_dir/wandb` differs from `run_dir/metrics.jsonl`."""
    want = merged_records(Path(run_dir) / "metrics.jsonl")
    got, repeated = history(Path(run_dir) / "wandb", run_id)
    problems = [f"step {step}: in more than one W&B segment" for step in repeated]
    for step in sorted(set(want) | set(got)):
        if step not in got:
            problems.append(f"step {step}: in metrics.jsonl, not in W&B")
        elif step not in want:
            problems.append(f"step {step}: in W&B, not in metrics.jsonl")
        elif not _same(want[step], got[step]):
            problems.append(f"step {step}: metrics.jsonl {want[step]} != W&B {got[step]}")
    return problems


def _same(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for key, x in a.items():
        y = b[key]
        both_nan = isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y)
        if x != y and not both_nan:
            return False
    return True


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python -m clm.wandb_log RUN_DIR", file=sys.stderr)
        return 2
    run_dir = Path(argv[0])
    found = segments(run_dir / "wandb")
    if not found:
        print(f"error: {run_dir}/wandb: no W&B run files", file=sys.stderr)
        return 2
    run_id = found[-1].run_id  # the latest run's id (a rerun with overwrite_output_dir starts anew)
    parts = [s for s in found if s.run_id == run_id]
    problems = differences(run_dir, run_id)
    steps = len(history(run_dir / "wandb", run_id)[0])
    where = ", ".join(s.path.parent.name for s in parts)
    if problems:
        print(f"{run_dir}/wandb: W&B run {run_id} ({where}) differs from metrics.jsonl:")
        for line in problems[:20]:
            print(f"  {line}")
        return 1
    print(f"{run_dir}/wandb: W&B run {run_id} ({where}): {steps} steps, equal to metrics.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
