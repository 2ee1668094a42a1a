"""Convert between HF safetensors checkpoints and this package's distributed checkpoints.

    # HF directory (e.g. Mixtral-8x22B-v0.1 downloaded with huggingface-cli) -> a checkpoint
    python scripts/convert_checkpoint.py hf-to-dcp /data/Mixtral-8x22B-v0.1 /data/ckpt/mixtral822
    python clm/run_clm.py +experiment=gbs256_tpu checkpoint_manager_path=/data/ckpt/mixtral822

    # a trained checkpoint (or a save_dir: its latest) -> an HF directory, to evaluate elsewhere
    python scripts/convert_checkpoint.py dcp-to-hf runs/x/checkpoints /data/hf-out \\
        --config clm/mixtral822.json

The checkpoint is written with torch.distributed.checkpoint, which reshards on load: the same
files restore on any mesh (tensor_parallelism, expert_parallelism, device count). Weights are
read with safetensors only (no pickle, no remote code). The HF side is loaded on one host, so
converting 8x22B needs a host with ~300 GB of memory. The HF directories are local; the
checkpoint side (hf-to-dcp's output, dcp-to-hf's input) may also be an fsspec URL, e.g.
`gs://bucket/ckpt/mixtral822` with the optional `gcs` extra (pip install gcsfs).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from clm import checkpoint  # noqa: E402
from clm.model import DTYPES, load_pretrained  # noqa: E402


def hf_to_dcp(hf_dir: Path, out: str | Path, dtype: str) -> checkpoint.Location:
    config = AutoConfig.from_pretrained(hf_dir, local_files_only=True)
    model = load_pretrained(str(hf_dir), config, DTYPES[dtype])
    return checkpoint.save_model(out, model)


def dcp_to_hf(source: str | Path, out: str | Path, config_path: Path, dtype: str) -> Path:
    if checkpoint.is_url(out):
        raise ValueError(f"{out}: dcp-to-hf writes a local directory (upload it afterwards)")
    out = Path(out)
    if out.exists():
        raise ValueError(f"{out}: already exists; choose a new output directory")
    if config_path.is_dir():
        config = AutoConfig.from_pretrained(config_path, local_files_only=True)
    else:
        values = json.loads(config_path.read_text())
        values.pop("transformers_version", None)
        config = AutoConfig.for_model(**values)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
    model.to_empty(device="cpu")
    model.init_weights()  # rotary buffers; every parameter is then overwritten by the restore
    checkpoint.restore(checkpoint.latest(source) or checkpoint.location(source), model, None)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer = config_path / "tokenizer.model" if config_path.is_dir() else None
    if tokenizer is not None and tokenizer.is_file():
        shutil.copy(tokenizer, out / "tokenizer.model")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="direction", required=True)
    a = sub.add_parser("hf-to-dcp", help="HF safetensors directory -> checkpoint")
    a.add_argument("hf_dir", type=Path)
    a.add_argument("out", help="checkpoint directory: a local path or an fsspec URL (gs://)")
    b = sub.add_parser("dcp-to-hf", help="checkpoint (or save_dir) -> HF safetensors directory")
    b.add_argument("checkpoint", help="a local path or an fsspec URL (gs://)")
    b.add_argument("out", help="HF output directory (local)")
    b.add_argument("--config", type=Path, required=True, help="model JSON or HF directory")
    for p in (a, b):
        p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    args = parser.parse_args(argv)
    try:
        if args.direction == "hf-to-dcp":
            written = hf_to_dcp(args.hf_dir, args.out, args.dtype)
        else:
            written = dcp_to_hf(args.checkpoint, args.out, args.config, args.dtype)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
