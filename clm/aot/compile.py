"""The libtpu half of `python -m clm.aot`: compile a traced program for a TPU topology, no TPU.

jax's compile-only client for a TPU topology (`jax.experimental.topologies.get_topology_desc`)
runs the TPU compiler of libtpu on a CPU-only host. A traced program (HLO text, `clm.aot.trace`)
is converted to StableHLO and compiled SPMD-partitioned over every device of the topology, as
torch_xla compiles a step on a pod: one partition per device, the shardings of the parameters
and outputs propagated from the program's annotations (without that, placeholders and outputs
would come out replicated). The compiler's own figures come back: per-device memory
(`get_compiled_memory_stats`), its cost model (`cost_analysis`: FLOPs, bytes, the step time it
predicts) and the optimized, partitioned HLO (whose collectives `clm.aot.hlo` counts).

Only jax, jaxlib and libtpu are imported here (never torch_xla): clm.aot runs this in its own
process. libtpu asks the TPU metadata service for worker hostnames at start-up; `COMPILE_ENV`
tells it there is none (as MaxText's and axlearn's AOT compiles do), and that this process
drives no TPU, so it needs not hold libtpu's lockfile.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

from clm.aot.hlo import peak_buffers

COMPILE_ENV = {
    "JAX_PLATFORMS": "cpu",  # the process's own jax backend; the TPU is only a compile target
    "TPU_SKIP_MDS_QUERY": "1",
    "TPU_WORKER_HOSTNAMES": "localhost",
    # libtpu locks /tmp/libtpu_lockfile for the process that drives the host's TPUs; a
    # compile-only client drives none, so several may run (and beside a training process)
    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
}


class LibtpuMissing(RuntimeError):
    """jax, jaxlib or libtpu cannot be imported or cannot describe a TPU topology."""


@dataclass
class Compiled:
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    flops: float
    bytes_accessed: float
    cost_model_seconds: float
    compile_seconds: float
    optimized_hlo: str

    @property
    def peak_bytes(self) -> int:
        """What the program holds on a device at once: its arguments, its outputs (less those
        that reuse a donated argument's buffer), its temporaries and its code."""
        return (
            self.argument_bytes
            + self.output_bytes
            - self.alias_bytes
            + self.temp_bytes
            + self.code_bytes
        )


def topology(name: str, num_slices: int = 1):
    """jax's description of a TPU topology ("v5p:4x8x8"), from libtpu, with no TPU attached."""
    try:
        from jax.experimental import topologies
    except ImportError as e:
        raise LibtpuMissing(f"jax is not importable ({e}): install requirements.lock") from e
    try:
        return topologies.get_topology_desc(
            platform="tpu", topology_name=name, num_slices=num_slices
        )
    except Exception as e:  # libtpu missing, or a topology it does not know
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LibtpuMissing(f"libtpu cannot describe TPU topology {name}: {first}") from e


def with_aliases(hlo: str, aliases: list[list[int]], outputs: int) -> str:
    """The HLO text with `input_output_alias` in its module header: output k reuses the buffer
    of parameter p for each [k, p] (torch_xla's donation of in-place updated inputs)."""
    if not aliases:
        return hlo
    header, rest = hlo.split("\n", 1)
    pairs = ", ".join(
        f"{{{'' if outputs == 1 else k}}}: ({p}, {{}}, may-alias)" for k, p in aliases
    )
    if ", entry_computation_layout=" not in header:
        raise ValueError("unexpected HLO module header: " + header[:200])
    header = header.replace(
        ", entry_computation_layout=",
        f", input_output_alias={{ {pairs} }}, entry_computation_layout=",
        1,
    )
    return header + "\n" + rest


def dump_flags(directory: Path) -> str:
    """XLA_FLAGS that make the compiler write its buffer assignment (the live buffers at the
    memory peak) into `directory`; read once, when libtpu starts, so set before `topology`."""
    return f"--xla_dump_to={directory}"


def read_peak(directory: Path) -> list[dict]:
    """The peak buffers of the program compiled last (clm.aot.hlo.peak_buffers), from the
    dump `dump_flags` asked for; [] without one."""
    dumps = sorted(directory.glob("module_*after_optimizations-buffer-assignment.txt"))
    if not dumps:
        return []
    latest = dumps[-1]
    optimized = latest.with_name(latest.name.replace("-buffer-assignment", ""))
    text = optimized.read_text() if optimized.exists() else ""
    return peak_buffers(latest.read_text(), text)


def compile_hlo(hlo: str, topo) -> Compiled:
    """Compile HLO text SPMD-partitioned over every device of `topo` (module docstring)."""
    import numpy as np
    from jax._src.lib import xla_client as xc

    devices = list(topo.devices)
    count = len(devices)
    proto = xc._xla.hlo_module_from_text(hlo).as_serialized_hlo_module_proto()
    module = xc._xla.mlir.hlo_to_stablehlo(proto)
    options = xc.CompileOptions()
    build = options.executable_build_options
    build.num_replicas = 1
    build.num_partitions = count
    build.use_spmd_partitioning = True
    # one entry applies to every output / parameter (libtpu aborts on another length)
    build.allow_spmd_sharding_propagation_to_output = [True]
    build.allow_spmd_sharding_propagation_to_parameters = [True]
    build.device_assignment = xc.DeviceAssignment.create(np.arange(count).reshape(1, count))
    start = time.perf_counter()
    executable = devices[0].client.compile(module, xc.DeviceList(tuple(devices)), options)
    seconds = time.perf_counter() - start
    memory = executable.get_compiled_memory_stats()
    cost = executable.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return Compiled(
        argument_bytes=int(memory.argument_size_in_bytes),
        output_bytes=int(memory.output_size_in_bytes),
        alias_bytes=int(memory.alias_size_in_bytes),
        temp_bytes=int(memory.temp_size_in_bytes),
        code_bytes=int(memory.generated_code_size_in_bytes),
        flops=float(cost.get("flops", 0.0)),
        bytes_accessed=float(cost.get("bytes accessed", 0.0)),
        cost_model_seconds=float(cost.get("optimal_seconds", 0.0)),
        compile_seconds=seconds,
        optimized_hlo="\n".join(m.to_string() for m in executable.hlo_modules()),
    )


def oom_summary(message: str, top: int = 4) -> str:
    """The TPU compiler's out-of-memory refusal in one line: its verdict and its largest
    allocations (size, shape, the torch op and Python line that made it)."""
    verdict = re.search(r"Ran out of memory[^\n]*", message)
    parts = [verdict.group(0).strip() if verdict else message.strip().splitlines()[0][:300]]
    entries = re.findall(r"Size: (\S+)\s+Operator: (.*?)\n\s+Shape: (\S+)", message, flags=re.S)
    largest = []
    for size, operator, shape in entries[:top]:
        fields = dict(re.findall(r'(\w+)="?([^" ]*)"?', operator))
        where = fields.get("source_file", "")
        where = where.split("/clm/")[-1] if "/clm/" in where else where.rsplit("/", 2)[-1]
        line = f"{where}:{fields['source_line']}" if where and "source_line" in fields else ""
        largest.append(f"{size} {re.sub(r'{[^}]*}', '', shape)} {line}".strip())
    if largest:
        parts.append("largest allocations: " + "; ".join(largest))
    return " ".join(parts)
