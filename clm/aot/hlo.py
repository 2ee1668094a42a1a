"""Reading an optimized, partitioned HLO module (text): its collectives, counted and sized.

Plain text parsing, no jax or torch: `clm.aot` runs it on the TPU compiler's output. Each
instruction whose opcode is a collective is counted once, where it starts (`all-gather-start`
counts, its `-done` does not; a collective the compiler wrapped in an async computation is
counted inside it). Bytes are per device: the size of the collective's result on one device
(for a `-start`, its last array: the gathered or permuted buffer). Counts and bytes are per
execution of the program: a collective in a loop body counts once per iteration
(`executions`).
"""

from __future__ import annotations

import re
from collections import Counter

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")

DTYPE_BYTES = {
    "pred": 1,
    "s4": 0.5,
    "u4": 0.5,
    "s8": 1,
    "u8": 1,
    "f8e4m3fn": 1,
    "f8e5m2": 1,
    "bf16": 2,
    "f16": 2,
    "s16": 2,
    "u16": 2,
    "f32": 4,
    "s32": 4,
    "u32": 4,
    "f64": 8,
    "s64": 8,
    "u64": 8,
    "c64": 8,
    "c128": 16,
}

_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<shape>.+?)\s+"
    r"(?P<op>all-gather-start|all-gather|reduce-scatter|all-reduce-start|all-reduce|"
    r"all-to-all|collective-permute-start|collective-permute)\("
)
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%(?P<name>[\w.\-]+)\s*\(.*\)\s*->\s*(?P<result>.*)\{\s*$")
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([\d,]*)\]")


def array_bytes(dtype: str, dims: str) -> float:
    count = 1
    for d in dims.split(","):
        if d:
            count *= int(d)
    return count * DTYPE_BYTES.get(dtype, 4)


def collectives(hlo: str) -> dict[str, dict[str, float]]:
    """{kind: {"count": n, "bytes": per-device result bytes}} for every kind in KINDS, per
    execution of the program: a collective in a loop body counts once per iteration.

    The TPU compiler writes a reduce-scatter as a computation named `all-reduce-scatter*`
    (an all-reduce and the device's slice of it, emitted as one reduce-scatter): its all-reduce
    counts as a reduce-scatter of the computation's result.
    """
    times = executions(hlo)
    counts: Counter = Counter()
    sizes: Counter = Counter()
    computation, result = "", []
    for line in hlo.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            computation = header.group("name")
            result = _ARRAY.findall(header.group("result"))
            continue
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        op = match.group("op").removesuffix("-start")
        arrays = _ARRAY.findall(match.group("shape"))
        if op != match.group("op") and op != "all-reduce":
            # (operands, results, u32[] contexts): the last array that is not a scalar
            arrays = [a for a in arrays if a[1]][-1:]
        if op == "all-reduce" and computation.startswith("all-reduce-scatter"):
            op, arrays = "reduce-scatter", result
        n = times.get(computation, 1)
        counts[op] += n
        sizes[op] += n * sum(array_bytes(dtype, dims) for dtype, dims in arrays)
    return {kind: {"count": counts[kind], "bytes": sizes[kind]} for kind in KINDS}


_CALLEE = re.compile(r"\b(?:calls|to_apply|body|condition|branch_computations)=\{?%?([\w.\-]+)")
_WHILE = re.compile(r"\bwhile\(.*\bcondition=%?([\w.\-]+), body=%?([\w.\-]+)")


def executions(hlo: str) -> dict[str, int]:
    """How many times each computation runs per execution of the module: the entry once, a
    while loop's body and condition its trip count times. The trip count is read from the
    loop's condition (the largest integer constant it compares the counter with: torch_xla's
    scan, the only loops of these programs, counts up to its length)."""
    bodies: dict[str, list[str]] = {}
    entry, name = "", ""
    for line in hlo.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            name = header.group("name")
            bodies[name] = []
            if line.startswith("ENTRY"):
                entry = name
        elif name:
            bodies[name].append(line)
    trips = {}
    for lines in bodies.values():
        for line in lines:
            loop = _WHILE.search(line)
            if loop:
                condition, body = loop.groups()
                constants = [
                    int(c)
                    for c in re.findall(
                        r"\bconstant\((\d+)\)", "\n".join(bodies.get(condition, []))
                    )
                ]
                trips[body] = trips[condition] = max(constants, default=1)
    times: dict[str, int] = {}

    def visit(computation: str, n: int) -> None:
        times[computation] = times.get(computation, 0) + n
        for line in bodies.get(computation, []):
            for callee in _CALLEE.findall(line):
                if callee in bodies:
                    visit(callee, n * trips.get(callee, 1))

    if entry:
        visit(entry, 1)
    return times


_LIVE = re.compile(r"^\s+(?P<name>[\w.\-]+)\{(?P<index>[\d,]*)\}: (?P<bytes>\d+) bytes")


def peak_buffers(buffer_assignment: str, optimized_hlo: str, top: int = 8) -> list[dict]:
    """The largest buffers live at the program's memory peak, from the compiler's buffer
    assignment dump (`--xla_dump_to`: the "Live ranges at N (peak)" list): name, bytes, shape
    (the instruction's, from the optimized module; for a tuple, all of it) and the source
    (`XLA_HLO_DEBUG` metadata: the torch op and the line of Python that made it)."""
    lines = buffer_assignment.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip().endswith("(peak):")), None)
    if start is None:
        return []
    live = []
    for line in lines[start + 1 :]:
        match = _LIVE.match(line)
        if not match:
            break
        live.append((match.group("name"), match.group("index"), int(match.group("bytes"))))
    live.sort(key=lambda item: -item[2])
    found = []
    for name, index, size in live[:top]:
        shape, source = _describe(optimized_hlo, name, index)
        found.append({"name": name, "bytes": size, "shape": shape, "source": source})
    return found


def _describe(hlo: str, name: str, index: str) -> tuple[str, str]:
    """(shape, source) of instruction `name`'s buffer at tuple `index` ("" for the whole)."""
    match = re.search(r"^\s*(?:ROOT\s+)?%" + re.escape(name) + r" = (?P<rest>.*)$", hlo, re.M)
    if not match:
        return "", ""
    rest = match.group("rest")
    meta = re.search(r"metadata=\{([^}]*)\}", rest)
    # the result shape: before the opcode, layouts and /*index=N*/ comments dropped
    result = re.sub(r"\{[^{}]*\}|/\*[^*]*\*/", "", rest).split(" ", 1)[0]
    if result.startswith("("):
        result = re.sub(r"\{[^{}]*\}|/\*[^*]*\*/", "", rest)
        result = result[: result.index(")") + 1]
    arrays = [f"{t}[{d}]" for t, d in _ARRAY.findall(result)]
    position = int(index.split(",")[0]) if index and result.startswith("(") else 0
    shape = arrays[position] if position < len(arrays) else result
    fields = dict(re.findall(r'(\w+)="?([^" ]*)"?', meta.group(1))) if meta else {}
    where = fields.get("source_file", "")
    if where:
        where = f"{where.split('/clm/')[-1] if '/clm/' in where else where}:{fields.get('source_line', '')}"
    source = " ".join(x for x in (fields.get("op_type", ""), where) if x)
    return shape, source or fields.get("op_name", "")


def tpu_kernels(hlo: str) -> dict[str, int]:
    """{"count": Pallas/Mosaic kernel calls per execution, "shapes": their distinct result
    shapes}: the `tpu_custom_call`s of the optimized program (flash attention's forward and
    backward kernels, here), each counted once per loop iteration."""
    times = executions(hlo)
    count, shapes, computation = 0, set(), ""
    for line in hlo.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            computation = header.group("name")
        elif 'custom_call_target="tpu_custom_call"' in line:
            count += times.get(computation, 1)
            result = re.sub(r"\{[^{}]*\}", "", line.split(" = ", 1)[1]).split(" custom-call(")[0]
            shapes.add(result)
    return {"count": count, "shapes": sorted(shapes)}
