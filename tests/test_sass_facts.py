"""The SASS facts of the SM90 attention programs (`tileprefill.sass_facts`).

The loop finder is checked on CPU against a listing written here; the `compile`-marked test
disassembles the compiled programs (the whole-set compile's cubins where this session built them),
prints the table and bounds what the consumer loop was changed to improve, so that a change
that gives it back fails CI.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

import pytest

from tileprefill import sass_facts
from tileprefill.sass_facts import LoopFacts, ProgramFacts

#: cuobjdump's second line of each instruction: its encoding's upper half.
_ENCODING = "/* 0x000fe40000000800 */"


def _listing(name: str, texts: Sequence[str]) -> str:
    """A `cuobjdump -sass` listing of one function: `texts` at 16-byte addresses; a branch written
    `BRA @label` goes to the instruction written `label: ...`."""
    labels = {t.split(":", 1)[0]: n for n, t in enumerate(texts) if ":" in t and not t.startswith("@")}
    lines = ["", "\tcode for sm_90a", f"\t\tFunction : {name}"]
    for n, text in enumerate(texts):
        text = text.split(": ", 1)[1] if text.split(":", 1)[0] in labels else text
        if "BRA @" in text:
            head, label = text.split("BRA @")
            text = f"{head}BRA {labels[label] * 16:#x}"
        lines.append(f"        /*{n * 16:04x}*/                   {text} ;   /* 0x0000000000007b1d */")
        lines.append(f"                                                   {_ENCODING}")
    return "\n".join(lines) + "\n"


def _key_step(top: str, turn: int, release_after: int, extra: int = 0) -> list[str]:
    """One key step of a consumer: its turn, an mbarrier wait (retried out of line), Q K^T and P V
    issue, the waits, the softmax (`extra` more instructions for a masked loop) and the V release
    `release_after` instructions after the P V wait; the last line branches back to `top`."""
    return [
        f"{top}: BAR.SYNC.DEFER_BLOCKING {turn:#x}, 0x100",
        f"{top}_wait: SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [R18+URZ], R3",
        "@!P0 BRA @retry",
        "WARPGROUP.ARRIVE",
        "R2UR UR19, R21",
        "HGMMA.64x128x16.F32 R24, gdesc[UR4].tnspB, RZ, !UPT, gsb0",
        "HGMMA.64x128x16.F32 R88, R152, gdesc[UR8], R88, gsb0",
        "BAR.ARV 0x9, 0x100",
        "WARPGROUP.DEPBAR.LE gsb0, 0x1",
        "SYNCS.ARRIVE.TRANS64.A1T0 RZ, [R2+URZ], RZ",
        *["FSEL R24, R24, -INF , !P1"] * extra,
        "SHFL.BFLY PT, R3, R20, 0x2, 0x1f",
        "WARPGROUP.DEPBAR.LE gsb0, 0x0",
        *["MUFU.EX2 R26, R26"] * (release_after - 1),
        "SYNCS.ARRIVE.TRANS64.A1T0 RZ, [R16+URZ], RZ",
        "SHFL.BFLY PT, R18, R21, 0x1, 0x1f",
        f"@!P0 BRA @{top}",
    ]


def _consumer(name: str, turn: int, release_after: int) -> list[str]:
    """A consumer warpgroup: raises its registers, then a persistent tile loop around an unmasked
    key-step loop and a masked one (8 instructions longer)."""
    return [
        "USETMAXREG.TRY_ALLOC.CTAPOOL UP0, 0xf0",
        f"{name}_tile: IMAD.MOV.U32 R13, RZ, RZ, R21",
        *_key_step(f"{name}_unmasked", turn, release_after),
        *_key_step(f"{name}_masked", turn, release_after, extra=8),
        f"@!P1 BRA @{name}_tile",
    ]


def _program() -> str:
    """A producer, then consumer 1 (turn barrier 9) before consumer 0 (8), the function's EXIT,
    and an out-of-line retry that branches back into consumer 1's loop."""
    texts = [
        "LDC R1, c[0x0][0x28]",
        "USETMAXREG.DEALLOC.CTAPOOL 0x18",
        "producer: SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [R3+URZ], R2",
        "@!P0 BRA @producer",
        "@P0 EXIT",
        *_consumer("second", 0x9, release_after=12),
        *_consumer("first", 0x8, release_after=3),
        "EXIT",
        "retry: NANOSLEEP.SYNCS 0x989680",
        "BRA @second_unmasked_wait",
        "tail: BRA @tail",
    ]
    return _listing("main_dense_kernel", texts)


def test_parse_reads_each_instruction_with_its_opcode_and_operands() -> None:
    functions = sass_facts.parse_sass(_program())
    assert list(functions) == ["main_dense_kernel"]
    instructions = functions["main_dense_kernel"]
    assert [(i.index, i.address) for i in instructions[:2]] == [(0, 0), (1, 16)]
    branch = instructions[3]
    assert (branch.text, branch.opcode, branch.operands) == ("@!P0 BRA 0x20", "BRA", "0x20")
    assert instructions[1].opcode == "USETMAXREG.DEALLOC.CTAPOOL"


def test_each_consumer_gets_its_unmasked_loop_by_its_turn_barrier() -> None:
    """The shortest innermost loop with HGMMA and MUFU.EX2 of each consumer region, numbered by its
    turn barrier (not by its place in the listing); the tile loop around it, the producer's loop and
    the retry's branch back from past EXIT are not loops of it."""
    instructions = sass_facts.parse_sass(_program())["main_dense_kernel"]
    loops = sass_facts.unmasked_loops(instructions)
    step = len(_key_step("x", 8, release_after=3))
    assert loops == (
        LoopFacts(0, loops[0].first, step, hgmma=2, mufu=2, shfl=2, r2ur=1, release_distance=3),
        LoopFacts(1, loops[1].first, step + 9, hgmma=2, mufu=11, shfl=2, r2ur=1, release_distance=12),
    )
    assert instructions[loops[0].first].text == "BAR.SYNC.DEFER_BLOCKING 0x8, 0x100"
    assert loops[1].first < loops[0].first  # consumer 1's code comes first in this listing


def test_a_loop_without_a_release_after_the_wait_reports_none() -> None:
    step = _key_step("only", 8, release_after=4)
    v_release = step.index("SYNCS.ARRIVE.TRANS64.A1T0 RZ, [R16+URZ], RZ")
    texts = ["USETMAXREG.TRY_ALLOC.CTAPOOL UP0, 0xf0", *step[:v_release], *step[v_release + 1 :], "EXIT"]
    texts += ["retry: BRA @only_wait"]
    (loop,) = sass_facts.unmasked_loops(sass_facts.parse_sass(_listing("k", texts))["k"])
    assert loop.release_distance is None and loop.consumer == 0


def test_a_function_without_consumers_has_no_loops() -> None:
    texts = ["top: MUFU.EX2 R2, R2", "HGMMA.64x128x16.F32 R24, gdesc[UR4], RZ, gsb0", "@P0 BRA @top", "EXIT"]
    assert sass_facts.unmasked_loops(sass_facts.parse_sass(_listing("k", texts))["k"]) == ()


def test_table_has_a_row_per_consumer() -> None:
    loop = LoopFacts(0, 10, 535, hgmma=16, mufu=66, shfl=8, r2ur=32, release_distance=312)
    program = ProgramFacts("attn_dense_sm90 d128", 168, 0, 0, 0, 0, (loop, loop))
    table = sass_facts.format_table([program, ProgramFacts("empty", 40, 0, 0, 0, 0, ())])
    rows = table.splitlines()[2:]
    assert len(rows) == 3
    assert rows[0].split() == "attn_dense_sm90 d128 0 535 16 66 8 32 312 168 0 0/0".split()
    assert "no key-step loop found" in rows[2]


#: The bounded programs (labels of `attention_tl.compile_cases(Arch.SM90)`): dense D 128 non-causal
#: (two consumers; the analysis behind these facts used it) and D 64 causal (three consumers).
D128 = "attn_dense_sm90 d128 fp16 non-causal"
D64 = "attn_dense_sm90 d64 bf16 causal"

#: The most instructions one unmasked key step may take, per consumer (D 128: 535 / 488 with its
#: row sums shuffled every step; 523 / 477 with partial sums under the previous dense order, 537 /
#: 478 with the band order's schedule state live across the loop; now 518 / 471 with the scale an
#: immediate, 523 / 477 with it a launch value. D 64: 447 / 438 / 434 with the scale either).
STEP_INSTRUCTIONS = {D128: (540, 482), D64: (457, 444, 440)}

#: The most SHFL an unmasked key step may run, per consumer: the row maxima's; D 128 adds its row
#: sums up once a query tile (three consumers, D 64, still shuffle them every step).
STEP_SHUFFLES = {D128: (4, 4), D64: (8, 8, 8)}

#: The most instructions from the P V wait to the V slot's release, per consumer: the release comes
#: ahead of the exponentials (was 312 / 281 at D 128, below the whole softmax; D 64's consumer 1
#: waits for P V before its row maxima, and releases after them; with the band order ptxas puts
#: about 18 instructions of the maxima between the wait and consumers 0 and 2's releases). D 64's
#: consumer 1: 54 with the scale, cap, window and head counts launch values, where ptxas issues the
#: wait ahead of all its row maxima (21 with them constants, the wait after 16 of their FMNMX).
RELEASE_DISTANCE = {D128: (8, 8), D64: (24, 54, 24)}

#: The most stack bytes (spills) of the program: D 64's consumers (128 registers each) spill outside
#: their key-step loops: 24 bytes with the scale, cap, window and head counts launch values; 32 with
#: them constants and the band layout's values held across tiles (24 without).
STACK_BYTES = {D128: 0, D64: 32}


def _whole_set_cubins(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path | None:
    """Where this session's whole-set compile (`test_compile.test_every_compile_case_compiles`) wrote
    its sm_90a cases, one directory a case as `compile_check` names it: `cubins-sm_90a<N>` under the
    session's base temporary directory (`tmp_path_factory.mktemp`); None before it has run."""
    found = sorted(tmp_path_factory.getbasetemp().glob("cubins-sm_90a*"))
    return found[-1] if found else None


@pytest.mark.compile
def test_sm90_consumer_loops_stay_within_their_bounds(
    tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    """Prints the table of every SM90 attention program this session compiled (and the bounded
    ones, compiled here if the whole-set compile has not built them), then checks the bounds."""
    tools = sass_facts.find_tools()
    assert tools is not None, sass_facts.MISSING_TOOLS
    whole_set = _whole_set_cubins(tmp_path_factory)
    own = tmp_path_factory.mktemp("sass-sm_90a")
    programs: dict[str, ProgramFacts] = {}
    for index, case in sass_facts.sm90_attention_cases():
        label = sass_facts.case_label(case)
        cubin = None if whole_set is None else sass_facts.case_cubin(whole_set, index, case)
        if cubin is None and label in STEP_INSTRUCTIONS:
            cubin = sass_facts.compiled_cubin(own, index, case)
        if cubin is not None:
            programs[label] = sass_facts.cubin_facts(cubin, label, tools)
    table = sass_facts.format_table(list(programs.values()))
    with capsys.disabled():  # the table shows in every compile run, not only on failure
        print(f"\nSASS facts of the SM90 attention programs:\n{table}")
    for label, most in STEP_INSTRUCTIONS.items():
        loops = programs[label].loops
        assert [loop.consumer for loop in loops] == list(range(len(most))), table
        assert all(loop.instructions <= n for loop, n in zip(loops, most, strict=True)), table
        assert all(loop.shfl <= n for loop, n in zip(loops, STEP_SHUFFLES[label], strict=True)), table
        distances = [-1 if loop.release_distance is None else loop.release_distance for loop in loops]
        assert all(0 <= d <= n for d, n in zip(distances, RELEASE_DISTANCE[label], strict=True)), table
        assert programs[label].stack_bytes <= STACK_BYTES[label], table
