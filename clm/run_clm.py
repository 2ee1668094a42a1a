"""Entry point: `python run_clm.py [overrides]` (inside clm/), `python clm/run_clm.py`, or the
installed `clm-train` console script, from any directory.

With no overrides it trains the embedded default (a small Mixtral on the shipped C4 sample);
`+experiment=gbs256_tpu` is the benchmark. Compose-only: add `--cfg job`.
Exit code 0 when the run ends normally (target or max_steps); 2 with a one-line reason on
stderr for a configuration or data error (a misspelt key or option included); 1 when training
itself fails (e.g. a NaN loss); 143 after SIGTERM and 130 after Ctrl-C (SIGINT): the step
finished and, with save_frequency > 0, a checkpoint saved.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `clm` importable without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from clm import config as config_lib  # noqa: E402
from clm.spec import load_spec  # noqa: E402

config_lib.register_resolvers()

USER_ERRORS = (ValueError, FileNotFoundError)


# An absolute config path: a relative one would make Hydra look for a package `clm.config`,
# which is clm/config.py when clm is installed (the console script), not the YAML directory.
@hydra.main(version_base=None, config_path=str(config_lib.CONFIG_DIR), config_name="config")
def _train(cfg: DictConfig) -> None:
    from clm.errors import OutputWriteError, Preempted, TrainingError
    from clm.trainer import run

    try:
        run(cfg)
    except USER_ERRORS as e:
        _exit(f"error: {e}", 2)
    except (TrainingError, OutputWriteError) as e:
        _exit(f"error: {e}", 1)
    except Preempted as e:
        # 128 + the signal: schedulers see a signalled job (SIGTERM: 143) and restart it
        _exit(f"stopped: {e}", 128 + e.signum)


def _exit(line: str, code: int) -> None:
    from clm.errors import say

    say(line)
    sys.exit(code)


def preflight(cfg: DictConfig) -> None:
    """A run's checks that need no device and no torch (ConfigError, a ValueError, on the first
    problem): the keys' values, the model JSON and `model.*` keys, and parallelism that no
    backend of run_clm.py runs."""
    config_lib.validate(cfg)
    load_spec(cfg.model, cfg.max_length)
    on_xla, torchrun = config_lib.runs_on_xla(cfg), config_lib.under_torchrun()
    config_lib.refuse_unimplemented(cfg, on_xla, torchrun)


def main() -> None:
    """Check the overrides as a run composes and validates them (one line and exit 2 on any
    error, in a second rather than after importing torch), then hand the command line to Hydra,
    which composes it again and calls `_train`."""
    from hydra._internal.utils import get_args_parser

    args = get_args_parser().parse_args()  # Hydra's own parser: the same reading as below
    own_config = args.config_path or args.config_name or args.config_dir
    try:
        if not (
            own_config or args.multirun or args.help or args.hydra_help or args.shell_completion
        ):
            try:
                cfg = config_lib.compose(args.overrides)
                if not args.cfg:  # a run: its device-free checks too, before torch is imported
                    preflight(cfg)
            except USER_ERRORS as e:
                _exit(f"error: {e}", 2)
        _train()
    except KeyboardInterrupt:  # in the training loop Ctrl-C stops after the step (Preempted)
        _exit(
            "stopped: SIGINT (Ctrl-C) outside the training loop; nothing was saved: rerun the "
            "same command (it resumes from the latest checkpoint, if any)",
            128 + signal.SIGINT,
        )


if __name__ == "__main__":
    main()
