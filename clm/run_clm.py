"""Entry point: `python run_clm.py [overrides]` (inside clm/) or `python clm/run_clm.py`.

With no overrides it trains the embedded default (a small Mixtral on the shipped C4 sample);
`+experiment=gbs256_tpu` is the benchmark. Compose-only: add `--cfg job`.
Exit code 0 when the run ends normally (target or max_steps); 2 with a one-line reason on
stderr for a configuration or data error; 1 when training itself fails (e.g. a NaN loss);
143 after SIGTERM (the step finished and, with save_frequency > 0, a checkpoint saved).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `clm` importable without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from clm.config import register_resolvers  # noqa: E402

register_resolvers()

USER_ERRORS = (ValueError, FileNotFoundError)


@hydra.main(version_base=None, config_path="config", config_name="config")
def main(cfg: DictConfig) -> None:
    from clm.errors import OutputWriteError
    from clm.trainer import Preempted, TrainingError, run

    try:
        run(cfg)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except (TrainingError, OutputWriteError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    except Preempted as e:
        print(f"stopped: {e}", file=sys.stderr, flush=True)
        sys.exit(143)  # 128 + SIGTERM: schedulers see a signalled job and restart it


if __name__ == "__main__":
    main()
