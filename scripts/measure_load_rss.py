"""Peak host memory of loading an HF safetensors Mixtral: clm's loader vs transformers'.

    python scripts/measure_load_rss.py /tmp/mixtral-86m            # writes it first if absent
    python scripts/measure_load_rss.py /tmp/mixtral-86m --dtype bfloat16
    python scripts/measure_load_rss.py /tmp/mixtral-86m-bf16 --save-dtype bfloat16 --dtype bfloat16
    python scripts/measure_load_rss.py /tmp/mixtral-86m --xla 4        # onto 4 XLA CPU devices
    python scripts/measure_load_rss.py /tmp/mixtral-86m --fsdp 2       # 2 FSDP2 ranks (gloo)

Each load runs in a fresh process; it prints the peak RSS (VmHWM) above the RSS after imports,
and what stays resident after the load (anonymous memory vs pages of mapped files).
`clm` is `clm.model.load_pretrained` (meta init, then each tensor read into its parameter);
`hf` is `AutoModelForCausalLM.from_pretrained`, the loader clm used before.
With `--xla N` the model goes onto an SPMD mesh of N devices of torch_xla's CPU runtime (whose
device memory is host memory, so the model itself counts once in every row): `xla-whole` loads
it whole on the CPU, then the backend shards it (`wrap_model`); `xla-pieces` is what the trainer
does, each piece (a decoder layer, or another module) read and handed to the backend's sharded
transfer before the next is read (`build_model(..., place=backend.place)`).
With `--fsdp N` it runs under torchrun as N CPU processes of the FSDP2 backend (each line is one
rank; on CPU a rank's shards are host memory, so 1/N of the model counts in every row):
`fsdp-whole` loads the whole model in each rank, then shards it; `fsdp-pieces` is what the
trainer does, sharding the meta model and copying each rank's slice of each piece
(`FsdpBackend.build_model`).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def status(key: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def write_model(directory: Path, dtype: str) -> None:
    """A Mixtral of 86M parameters (330 MB in fp32), saved in shards in the original layout."""
    import torch
    from transformers import AutoModelForCausalLM, MixtralConfig

    config = MixtralConfig(
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        num_local_experts=8,
        num_experts_per_tok=2,
        use_cache=False,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(getattr(torch, dtype))
    model.save_pretrained(directory, max_shard_size="100MB")


def measure(directory: str, dtype: str, loader: str) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from clm import model as model_lib

    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    backend = None
    if loader.startswith("xla"):
        from clm.backends.xla_backend import XlaBackend

        backend = XlaBackend()
    if loader.startswith("fsdp"):
        from hydra import compose, initialize_config_dir

        from clm import config as config_lib
        from clm.backends.fsdp_backend import FsdpBackend
        from clm.spec import load_spec

        config_lib.register_resolvers()
        with initialize_config_dir(str(config_lib.CLM_DIR / "config"), version_base=None):
            cfg = compose(
                "config",
                overrides=[
                    "model.config_path=null",
                    f"model.name_or_path={directory}",
                    f"model.dtype={dtype}",
                ],
            )
        backend = FsdpBackend(cfg, "cpu")
    before = {key: status(key) for key in ("VmRSS:", "RssAnon:", "RssFile:")}
    start = time.perf_counter()
    if loader == "xla-whole":
        model = backend.wrap_model(
            model_lib.load_pretrained(directory, config, model_lib.DTYPES[dtype])
        )
    elif loader == "xla-pieces":
        model = backend.wrap_model(
            model_lib.load_pretrained(directory, config, model_lib.DTYPES[dtype], backend.place)
        )
    elif loader == "fsdp-whole":
        model = backend.wrap_model(
            model_lib.load_pretrained(directory, config, model_lib.DTYPES[dtype])
        )
    elif loader == "fsdp-pieces":
        spec = load_spec(cfg.model)
        model = backend.build_model(spec, 0)
    elif loader == "clm":
        model = model_lib.load_pretrained(directory, config, model_lib.DTYPES[dtype])
    else:
        model = AutoModelForCausalLM.from_pretrained(
            directory, config=config, dtype=model_lib.DTYPES[dtype], local_files_only=True
        )
    seconds = time.perf_counter() - start
    size = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    if backend is not None and loader.startswith("fsdp"):  # global sizes; rank r's line
        loader = f"{loader} rank {backend.rank}"
        backend.close()
    peak = status("VmHWM:") - before["VmRSS:"]
    anon = status("RssAnon:") - before["RssAnon:"]
    files = status("RssFile:") - before["RssFile:"]
    print(
        f"{loader:3s} {dtype:8s} model {size:5.0f} MiB: peak +{peak:5.0f} MiB "
        f"({peak / size:.2f}x); resident after: anon +{anon:.0f}, mapped files +{files:.0f} MiB; "
        f"{seconds:.1f} s",
        flush=True,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("directory", type=Path)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--save-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument(
        "--xla", type=int, metavar="N", help="load onto N devices of torch_xla's CPU runtime"
    )
    parser.add_argument("--fsdp", type=int, metavar="N", help="load into N FSDP2 CPU processes")
    loaders = ["clm", "hf", "xla-whole", "xla-pieces", "fsdp-whole", "fsdp-pieces"]
    parser.add_argument("--loader", choices=loaders, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.loader:
        measure(str(args.directory), args.dtype, args.loader)
        return 0
    if not args.directory.exists():
        write_model(args.directory, args.save_dtype)
    env = dict(os.environ)
    if args.xla:
        env.update(PJRT_DEVICE="CPU", CPU_NUM_DEVICES=str(args.xla))
    loaders = ("hf", "clm")
    launcher = [sys.executable]
    if args.xla:
        loaders = ("xla-whole", "xla-pieces")
    elif args.fsdp:
        loaders = ("fsdp-whole", "fsdp-pieces")
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.fsdp}"]
        env["OMP_NUM_THREADS"] = "1"
    for loader in loaders:
        command = [*launcher, __file__, str(args.directory), "--dtype", args.dtype]
        subprocess.run([*command, "--loader", loader], check=True, env=env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
