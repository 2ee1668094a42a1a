"""Pallas kernels on XLA: whether the program is built for a TPU, and lowering them for one.

torch_xla runs a Pallas kernel (the flash attention of `clm.backends.xla_attention`) as a TPU custom call
whose payload jax lowers from the kernel (torch_xla's `custom_kernel.trace_pallas`). The
package picks such kernels where the XLA program is for a TPU: `on_tpu()`, true on a TPU
runtime, and inside `targeting_tpu()`, which `clm.aot` uses to trace a TPU program on the CPU
runtime of a machine without one.

Lowering for a TPU there takes two changes to what torch_xla 2.9.0 does, made only inside
`targeting_tpu()` and only for the versions they were proven with (`PROVEN`; anything else is
refused with a one-line error rather than lowered differently):
- the kernel is lowered for the TPU platform instead of the process's default one (torch_xla
  lowers for the default platform: the CPU there, where Pallas has only an interpreter mode);
- in jax's forward-compatible lowering (what `jax.export` uses for serialized programs): jax
  0.7.1 picks the Mosaic IR version from the build date of the runtime's libtpu, which a CPU
  host has not, and then emits version 8, which the libtpu 0.0.21 compiler refuses ("expected
  <= 7"); forward-compatible lowering emits 7.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.util
import logging
import os

# the versions `targeting_tpu` was proven with (torch_xla 2.9.0's pins for its pallas/tpu extras)
PROVEN = {"torch_xla": "2.9.0", "jax": "0.7.1", "jaxlib": "0.7.1"}

_TARGET_TPU = False  # inside targeting_tpu()


def on_tpu() -> bool:
    """Whether the XLA program being built runs on a TPU (the runtime's, or an AOT target)."""
    if _TARGET_TPU:
        return True
    try:
        import torch_xla.runtime as xr

        return xr.device_type() == "TPU"
    except (ImportError, RuntimeError):
        return False


def jax_for_this_runtime() -> None:
    """Before jax starts: off a TPU runtime, jax (which lowers what torch_xla hands it: Pallas
    kernels, `call_jax` functions) uses the CPU platform, not the TPU an installed libtpu
    offers, which it would try to initialize. An explicit JAX_PLATFORMS wins."""
    if os.environ.get("PJRT_DEVICE") != "TPU":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")


def tame_torchax() -> None:
    """Import torchax now, and keep torch from taking its device for an accelerator.

    torch_xla imports torchax (its wheel carries it) at its first `mark_sharding`, and `call_jax`
    (clm.expert_slots) and the scan's backward under SPMD need it. On import torchax names
    torch's PrivateUse1 backend "jax" and registers a device module that says it is
    available; torch.distributed then takes it for the machine's accelerator: DCP's file
    writer asks it for CUDA-style streams ("has no attribute 'current_stream'") and
    `dist.barrier` fails ("Please register PrivateUse1HooksInterface"; clm.checkpoint's
    `cpu_barrier` avoids it). Its device is never used here (torch_xla's tensors are XLA
    tensors), so it is marked unavailable."""
    if torchax_import_error() is not None:
        return  # torch_xla goes without it; call_jax_available() says why
    import torchax.device_module

    torchax.device_module.is_available = lambda: False


@functools.cache
def torchax_import_error() -> str | None:
    """Why torchax does not import, or None. The torchax inside torch_xla 2.9.0's wheel imports
    flax's checkpoints (and through them orbax) at package import; requirements.lock pins flax.
    flax logs through absl that TensorFlow is missing (irrelevant here), so that is hushed."""
    if importlib.util.find_spec("torchax") is None:
        return "torchax is not installed"
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        import torchax  # noqa: F401
    except ImportError as err:
        return f"torchax does not import ({err})"
    finally:
        absl.setLevel(level)
    return None


def jax_available() -> bool:
    return importlib.util.find_spec("jax") is not None


def call_jax_available() -> bool:
    """torch_xla's `call_jax` (clm.expert_slots on XLA) needs jax and the torchax package."""
    return jax_available() and torchax_import_error() is None


def version_mismatches() -> list[str]:
    """'name found X, proven Y' for each package of PROVEN at another version (or missing)."""
    wrong = []
    for name, proven in PROVEN.items():
        try:
            found = importlib.metadata.version(name.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            found = "none"
        if found.split("+")[0] != proven:
            wrong.append(f"{name} {found} (proven with {proven})")
    return wrong


@contextlib.contextmanager
def targeting_tpu():
    """Inside: kernels are picked as on a TPU and Pallas kernels are lowered for one.

    Raises RuntimeError naming the packages when they are not the PROVEN versions.
    """
    global _TARGET_TPU
    wrong = version_mismatches()
    if wrong:
        raise RuntimeError(
            "lowering Pallas kernels for a TPU off a TPU was proven with torch_xla "
            f"{PROVEN['torch_xla']}, jax {PROVEN['jax']} and jaxlib {PROVEN['jaxlib']}; "
            f"found {', '.join(wrong)}"
        )
    from torch_xla.experimental import custom_kernel

    previous = custom_kernel.trace_pallas
    custom_kernel.trace_pallas = _trace_pallas_for_tpu
    _TARGET_TPU = True
    try:
        yield
    finally:
        _TARGET_TPU = False
        custom_kernel.trace_pallas = previous


def _trace_pallas_for_tpu(
    kernel, *args, static_argnums=None, static_argnames=None, use_cache=False, **kwargs
):
    """torch_xla 2.9.0's `custom_kernel.trace_pallas` (same arguments and results: the custom
    call's payload and the tensor arguments), lowering for the TPU platform in jax's
    forward-compatible mode (module docstring). No payload cache: each call lowers afresh."""
    import jax
    import jax._src.pallas.mosaic.pallas_call_registration  # noqa: F401  registers the TPU rule
    import torch
    from jax._src.interpreters import mlir
    from torch_xla.experimental.custom_kernel import (
        _extract_backend_config,
        to_jax_shape_dtype_struct,
    )

    jax_args, tensor_args = [], []
    for arg in args:
        if torch.is_tensor(arg):
            jax_args.append(to_jax_shape_dtype_struct(arg))
            tensor_args.append(arg)
        else:
            jax_args.append(arg)
    traced = jax.jit(kernel, static_argnums=static_argnums, static_argnames=static_argnames).trace(
        *jax_args, **kwargs
    )
    lowered = traced.lower(
        lowering_platforms=("tpu",),
        _private_parameters=mlir.LoweringParameters(for_export=True),
    )
    return _extract_backend_config(lowered.compiler_ir()), tensor_args
