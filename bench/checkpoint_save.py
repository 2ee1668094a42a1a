"""How long a checkpoint save blocks the training loop: synchronous vs asynchronous.

    PJRT_DEVICE=CPU CPU_NUM_DEVICES=4 PYTHONPATH=. .venv/bin/python bench/checkpoint_save.py xla
    PYTHONPATH=. .venv/bin/python bench/checkpoint_save.py cpu

The embedded default model (clm/mixtral_small.json) with AdamW state, one train step before each
save, waited for (as in the trainer, where a save step reads its loss first). "blocked" is the
time the save call holds the caller (sync: the copy from the devices, the write and the commit;
async: the copy to host memory), "committed" the time until the checkpoint is committed.
Alternating sync and async saves, into a temporary directory on the local disk.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time

import torch
from omegaconf import OmegaConf

from clm import checkpoint
from clm.config import CLM_DIR, register_resolvers
from clm.model import build_model
from clm.spec import load_spec

# the embedded default's model: the `model` group's default, as the trainer composes it
register_resolvers()  # its config_path is ${embedded_model:...}
MODEL = load_spec(OmegaConf.load(CLM_DIR / "config" / "model" / "blank_model.yaml"))


def main(kind: str, saves: int = 5) -> None:
    if kind == "xla":
        from clm.backends.xla_backend import XlaBackend

        backend = XlaBackend(1, 1)
    else:
        from clm.backends.torch_backend import TorchBackend

        backend = TorchBackend(torch.device("cpu"))
    model = build_model(MODEL, backend.init_device, 0)
    model = backend.wrap_model(model)
    optimizer = backend.optimizer_class("ADAMW_TORCH")(model.parameters(), lr=1e-3)
    batch = backend.to_device({"input_ids": torch.arange(8 * 256).reshape(8, 256) % 1000})

    def step():
        model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        backend.step_boundary()

    saver = checkpoint.AsyncSaver()
    times = {"sync": ([], []), "async": ([], [])}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(saves + 1):  # the first round warms up
            for mode in ("sync", "async"):
                step()
                backend.sync()
                t0 = time.perf_counter()
                if mode == "sync":
                    checkpoint.save(
                        f"{tmp}/{mode}", i, model, optimizer, {"step": i}, keep_last_n=1,
                        **backend.checkpoint_options(load=False),
                    )  # fmt: skip
                    blocked = committed = time.perf_counter() - t0
                else:
                    saver.save(
                        f"{tmp}/{mode}", i, model, optimizer, {"step": i}, keep_last_n=1,
                        stage=backend.stage_checkpoint,
                    )  # fmt: skip
                    blocked = time.perf_counter() - t0
                    saver.wait()
                    committed = time.perf_counter() - t0
                if i:
                    times[mode][0].append(blocked)
                    times[mode][1].append(committed)
    print(f"# {backend.device_description()}; {saves} saves each, medians")
    for mode, (blocked, committed) in times.items():
        print(
            f"{mode:5s}: blocked {statistics.median(blocked) * 1e3:7.1f} ms, "
            f"committed after {statistics.median(committed) * 1e3:7.1f} ms"
        )
    backend.close()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "cpu")
