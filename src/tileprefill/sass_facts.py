"""Static machine-code facts of the SM90 attention programs: each consumer's unmasked key-step loop.

`python -m tileprefill.sass_facts [--cubins DIR] [--only TEXT]` compiles the SM90 attention
programs of the compile check (`attention_tl.compile_cases`) for sm_90a, or reads their cubins
from a `python -m tileprefill.compile_check --arch sm_90a --out-dir DIR` run, disassembles each
(`cuobjdump -sass`) and prints one row per consumer warpgroup: the instructions of one unmasked
key step (the loop body), its `HGMMA`, `MUFU`, `SHFL` and `R2UR` counts, how many instructions
after the P V wait the V slot is released, and the program's registers, stack and spill
instructions (`cuobjdump -res-usage`, `STL`/`LDL`). No GPU is needed; the tools come with the CUDA
toolkit or the `nvidia-cuda-cuobjdump` and `nvidia-cuda-nvdisasm` wheels (the dev extra).

How the loop is found in the listing (by structure; ptxas keeps the source's block order):

- The body of the function ends at its last `EXIT`. After it ptxas places out-of-line blocks
  (mbarrier wait retries) that branch back into the loops; those branches are not loops.
- Each consumer warpgroup's code starts where it raises its registers (`USETMAXREG.TRY_ALLOC`;
  the producer lowers them, `USETMAXREG.DEALLOC`) and ends where the next warpgroup's starts.
- A loop is a backward `BRA` inside one such region: its body runs from the branch target to
  the branch. A key-step loop holds at least one `HGMMA` and one `MUFU.EX2` and no smaller
  loop that does (the persistent tile loop around it holds them too).
- The consumer's index is read from its turn barrier, the `BAR.SYNC` of `TURN_THREADS` threads
  on `TURN_BARRIER + c` that opens every key step (attention_sm90).
- Of a consumer's key-step loops (unmasked; masked: the causal diagonal and the partial last
  tile; with a window, also the tiles before it) the unmasked one is the shortest: the masked
  ones add a compare and select a score and the empty-row guard.
- The P V wait is the loop's last `WARPGROUP.DEPBAR.LE gsb0, 0x0` (the wait for every
  outstanding wgmma; the one for Q K^T keeps one group in flight, `0x1`); the V slot's release
  is the first mbarrier arrive (`SYNCS.ARRIVE`) after it. The distance counts instructions.

Each fact is a count of instructions in the listing, not of clocks: a guide to what changed in the
machine code, checked in CI (`tests/test_sass_facts.py`) where a change is meant to improve it.
"""

from __future__ import annotations

import argparse
import itertools
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence

import attrs

from tileprefill import compile_check
from tileprefill.context import Arch
from tileprefill.kernels import attention_tl
from tileprefill.kernels.compile import CompileCase
from tileprefill.kernels.tl.attention_sm90 import TURN_BARRIER, TURN_THREADS

#: One instruction of `cuobjdump -sass`: `/*0a50*/  @!P1 BRA 0xf30 ;`.
_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(.*?)\s*;")
_FUNCTION = re.compile(r"^\s*Function\s*:\s*(\S+)")
#: A branch's target address: its last operand (`BRA 0x5290`, `BRA.U !UP0, 0x5290`).
_BRANCH_TARGET = re.compile(r"0x([0-9a-f]+)$")
_TURN_BARRIER = re.compile(r"^BAR\.SYNC(?:\.DEFER_BLOCKING)?\s+(0x[0-9a-f]+|\d+),\s*(0x[0-9a-f]+|\d+)$")
_RESOURCES = re.compile(r"Function\s+(\S+):\s*\n\s*REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


@attrs.frozen
class Instruction:
    """One instruction: its position in the function's listing, its byte address and its text
    (`@!P0 BRA 0x5290`)."""

    index: int
    address: int
    text: str

    @property
    def opcode(self) -> str:
        """The opcode with its modifiers, without the predicate: `WARPGROUP.DEPBAR.LE`."""
        words = self.text.split()
        return words[1] if words[0].startswith("@") and len(words) > 1 else words[0]

    @property
    def operands(self) -> str:
        return self.text.split(self.opcode, 1)[1].strip()


@attrs.frozen
class LoopFacts:
    """The unmasked key-step loop of one consumer warpgroup."""

    consumer: int
    first: int  # listing index of the loop's first instruction
    instructions: int  # one key step: the loop body, its closing branch included
    hgmma: int
    mufu: int
    shfl: int
    r2ur: int
    #: Instructions from the P V wait to the V slot's release; None if the loop has no release after it.
    release_distance: int | None


@attrs.frozen
class ProgramFacts:
    """One SM90 attention program's loops (consumer order) and resources."""

    label: str
    registers: int
    stack_bytes: int
    local_bytes: int
    spill_stores: int  # STL instructions in the whole function
    spill_loads: int  # LDL
    loops: tuple[LoopFacts, ...]


def parse_sass(listing: str) -> dict[str, tuple[Instruction, ...]]:
    """The instructions of each function of a `cuobjdump -sass` listing, by function name."""
    functions: dict[str, list[Instruction]] = {}
    current: list[Instruction] | None = None
    for line in listing.splitlines():
        if name := _FUNCTION.match(line):
            current = functions.setdefault(name.group(1), [])
            continue
        found = _INSTRUCTION.match(line)
        if found and current is not None:
            current.append(Instruction(len(current), int(found.group(1), 16), found.group(2)))
    return {name: tuple(instructions) for name, instructions in functions.items()}


def _branch_target(instruction: Instruction) -> int | None:
    if not instruction.opcode.startswith("BRA"):
        return None
    found = _BRANCH_TARGET.search(instruction.operands)
    return int(found.group(1), 16) if found else None


def _count(body: Sequence[Instruction], prefix: str) -> int:
    return sum(1 for i in body if i.opcode.startswith(prefix))


def _consumer_regions(instructions: Sequence[Instruction], end: int) -> list[tuple[int, int]]:
    """[start, stop) of each warpgroup region that raises its registers, up to the body's end."""
    starts = [i.index for i in instructions[:end] if i.opcode.startswith("USETMAXREG")]
    bounds = [*starts, end]
    return [
        (start, stop)
        for start, stop in itertools.pairwise(bounds)
        if instructions[start].opcode.startswith("USETMAXREG.TRY_ALLOC")
    ]


def _turn_barrier(body: Sequence[Instruction]) -> int | None:
    """The id of the first barrier of TURN_THREADS threads the loop waits on."""
    for i in body:
        found = _TURN_BARRIER.match(f"{i.opcode} {i.operands}")
        if found and int(found.group(2), 0) == TURN_THREADS:
            return int(found.group(1), 0)
    return None


def _loop_facts(body: Sequence[Instruction], consumer: int) -> LoopFacts:
    waits = [n for n, i in enumerate(body) if i.opcode == "WARPGROUP.DEPBAR.LE" and i.operands == "gsb0, 0x0"]
    distance = None
    if waits:
        after = [n for n, i in enumerate(body) if n > waits[-1] and i.opcode.startswith("SYNCS.ARRIVE")]
        distance = after[0] - waits[-1] if after else None
    return LoopFacts(
        consumer=consumer,
        first=body[0].index,
        instructions=len(body),
        hgmma=_count(body, "HGMMA"),
        mufu=_count(body, "MUFU"),
        shfl=_count(body, "SHFL"),
        r2ur=_count(body, "R2UR"),
        release_distance=distance,
    )


def unmasked_loops(instructions: Sequence[Instruction]) -> tuple[LoopFacts, ...]:
    """Each consumer's unmasked key-step loop (the module docstring says how it is found), by
    consumer index; empty for a function without consumer warpgroups."""
    exits = [i.index for i in instructions if i.text == "EXIT"]
    end = exits[-1] + 1 if exits else len(instructions)
    by_address = {i.address: i.index for i in instructions}
    loops: dict[int, list[tuple[int, int]]] = {}
    for start, stop in _consumer_regions(instructions, end):
        for branch in instructions[start:stop]:
            target = _branch_target(branch)
            first = by_address.get(target) if target is not None else None
            if first is None or not start <= first < branch.index:
                continue
            body = instructions[first : branch.index + 1]
            if _count(body, "HGMMA") and _count(body, "MUFU.EX2"):
                loops.setdefault(start, []).append((first, branch.index))
    found: dict[int, LoopFacts] = {}
    for region_number, region_loops in enumerate(loops.values()):
        innermost = [
            (a, b)
            for a, b in region_loops
            if not any((a, b) != (c, d) and a <= c and d <= b for c, d in region_loops)
        ]
        a, b = min(innermost, key=lambda loop: loop[1] - loop[0])
        body = instructions[a : b + 1]
        barrier = _turn_barrier(body)
        consumer = barrier - TURN_BARRIER if barrier is not None else region_number
        found[consumer] = _loop_facts(body, consumer)
    return tuple(found[c] for c in sorted(found))


@attrs.frozen
class Tools:
    """Paths of the CUDA binary utilities."""

    cuobjdump: str
    nvdisasm: str

    def run(self, *args: str) -> str:
        # cuobjdump -sass runs nvdisasm, which it looks for on PATH.
        env = {**os.environ, "PATH": os.pathsep.join([os.path.dirname(self.nvdisasm), os.environ["PATH"]])}
        done = subprocess.run(
            [self.cuobjdump, *args], capture_output=True, text=True, env=env, check=False, timeout=300
        )
        if done.returncode != 0:
            raise RuntimeError(f"cuobjdump {' '.join(args)}: exit {done.returncode}: {done.stderr.strip()}")
        return done.stdout


def _tool(name: str) -> str | None:
    """`name` on PATH, in $CUDA_HOME/bin, or in an `nvidia-cuda-*` wheel (nvidia/cu*/bin)."""
    found = shutil.which(name)
    if found:
        return found
    cuda_home = pathlib.Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / name
    if cuda_home.is_file():
        return str(cuda_home)
    for entry in sys.path:
        for candidate in sorted(pathlib.Path(entry).glob(f"nvidia/cu*/bin/{name}")):
            if os.access(candidate, os.X_OK):
                return str(candidate)
    return None


#: What to do where `find_tools` finds nothing.
MISSING_TOOLS = "cuobjdump and nvdisasm not found: install the dev extra (nvidia-cuda-cuobjdump, -nvdisasm)"


def find_tools() -> Tools | None:
    """cuobjdump and nvdisasm, or None where either is missing."""
    cuobjdump, nvdisasm = _tool("cuobjdump"), _tool("nvdisasm")
    if cuobjdump is None or nvdisasm is None:
        return None
    return Tools(cuobjdump, nvdisasm)


def cubin_facts(cubin: pathlib.Path, label: str, tools: Tools) -> ProgramFacts:
    """The facts of the one kernel function in `cubin`."""
    functions = parse_sass(tools.run("-sass", str(cubin)))
    resources = {m.group(1): m for m in _RESOURCES.finditer(tools.run("-res-usage", str(cubin)))}
    if len(functions) != 1 or set(functions) != set(resources):
        raise ValueError(
            f"{cubin}: expected one kernel function, got {sorted(functions)} "
            f"(resources of {sorted(resources)})"
        )
    name, instructions = next(iter(functions.items()))
    usage = resources[name]
    return ProgramFacts(
        label=label,
        registers=int(usage.group(2)),
        stack_bytes=int(usage.group(3)),
        local_bytes=int(usage.group(5)),
        spill_stores=_count(instructions, "STL"),
        spill_loads=_count(instructions, "LDL"),
        loops=unmasked_loops(instructions),
    )


def sm90_attention_cases() -> tuple[tuple[int, CompileCase], ...]:
    """The SM90 attention programs of the compile check, with their index among its sm_90a cases
    (what its output directories are named by)."""
    attention = attention_tl.compile_cases(Arch.SM90)
    cases = compile_check.collect_cases(Arch.SM90)
    return tuple((n, case) for n, case in enumerate(cases) if case in attention)


def case_label(case: CompileCase) -> str:
    return f"{case.key.value} {case.label}"


def case_cubin(root: pathlib.Path, index: int, case: CompileCase) -> pathlib.Path | None:
    """The cubin the compile check wrote for case `index` under `root`, or None."""
    cubins = sorted(pathlib.Path(compile_check._case_dir(str(root), index, case)).rglob("*.cubin"))
    return cubins[0] if cubins else None


def compiled_cubin(root: pathlib.Path, index: int, case: CompileCase) -> pathlib.Path:
    """The case's cubin under `root` as the compile check names it, compiled there first if absent."""
    cubin = case_cubin(root, index, case)
    if cubin is None:
        outcome = compile_check.compile_case(case, Arch.SM90, compile_check._case_dir(str(root), index, case))
        if outcome.error is not None:
            raise RuntimeError(f"{case_label(case)}: {outcome.error}")
        cubin = case_cubin(root, index, case)
    if cubin is None:
        raise RuntimeError(f"{case_label(case)}: no .cubin written under {root}")
    return cubin


def format_table(programs: Sequence[ProgramFacts]) -> str:
    header = (
        f"{'program':<46} {'wg':>2} {'instr/step':>10} {'HGMMA':>5} {'MUFU':>4} {'SHFL':>4} {'R2UR':>4} "
        f"{'V release':>9} {'regs':>4} {'stack':>5} {'STL/LDL':>7}"
    )
    lines = [header, "-" * len(header)]
    for p in programs:
        resources = f"{p.registers:>4} {p.stack_bytes:>5} {f'{p.spill_stores}/{p.spill_loads}':>7}"
        if not p.loops:
            lines.append(f"{p.label:<46} {'-':>2} {'no key-step loop found':>48} {resources}")
        for loop in p.loops:
            release = "-" if loop.release_distance is None else str(loop.release_distance)
            lines.append(
                f"{p.label:<46} {loop.consumer:>2} {loop.instructions:>10} {loop.hgmma:>5} {loop.mufu:>4} "
                f"{loop.shfl:>4} {loop.r2ur:>4} {release:>9} {resources}"
            )
    return "\n".join(lines)


def main(*, cubins: str | None, only: str | None) -> int:
    """Print the table of the SM90 attention programs whose label contains `only` (all without):
    read from `cubins` (a compile check's --out-dir), compiling there what is missing, or
    compiled into a scratch directory. 0 iff every program gave its facts."""
    tools = find_tools()
    if tools is None:
        print(f"sass facts: {MISSING_TOOLS}")
        return 1
    chosen = [(n, case) for n, case in sm90_attention_cases() if only is None or only in case_label(case)]
    if not chosen:
        print(f"only: expected text found in an SM90 attention program's label, got {only!r}")
        return 1
    with tempfile.TemporaryDirectory(prefix="tileprefill-sass-") as scratch:
        root = pathlib.Path(cubins if cubins is not None else scratch)
        programs = [cubin_facts(compiled_cubin(root, n, case), case_label(case), tools) for n, case in chosen]
    print(format_table(programs))
    return 0


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tileprefill.sass_facts", description=__doc__)
    parser.add_argument(
        "--cubins",
        default=None,
        help="a compile check's --out-dir: read its sm_90a cubins there (what is missing is compiled there)",
    )
    parser.add_argument("--only", default=None, help="only the programs whose label contains this text")
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = _parse(sys.argv[1:])
    sys.exit(main(cubins=args.cubins, only=args.only))
