"""The command line's flag values: each parsed to a value or kept as a `BadValue`, so that every bad
flag of a command line is reported at once, each naming its flag, what it expects and what it got.
Shared by `tileprefill.cli` and the subcommands that live beside their own modules (`aot.command`)."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

import attrs

from tileprefill.context import Arch, DType

#: The spellings of the activation dtypes.
DTYPE_SPELLINGS = {"fp16": DType.FP16, "bf16": DType.BF16}

#: Every spelling of an arch the flags accept: ours (Arch's value, the one printed) and nvcc's.
ARCH_SPELLINGS: dict[str, Arch] = {
    "cpu": Arch.CPU,
    "sm80": Arch.SM80,
    "sm_80": Arch.SM80,
    "sm90": Arch.SM90,
    "sm_90": Arch.SM90,
    "sm_90a": Arch.SM90,
}
#: The arches TileLang programs are compiled for.
COMPILED_ARCHS: tuple[Arch, ...] = (Arch.SM80, Arch.SM90)


@attrs.frozen
class BadValue:
    """A flag's value that does not parse, kept (not raised) so that every bad flag of a command line
    is reported at once."""

    message: str


T = TypeVar("T")


def one_of(flag: str, values: Mapping[str, T], expected: str) -> Callable[[str], T | BadValue]:
    def parse(text: str) -> T | BadValue:
        return values[text] if text in values else BadValue(f"{flag}: expected {expected}, got {text!r}")

    return parse


def add_choice(
    parser: argparse.ArgumentParser, flag: str, values: Mapping[str, object], default: object, help: str
) -> None:
    parser.add_argument(
        flag,
        type=one_of(flag, values, "one of " + ", ".join(values)),
        metavar="{" + ",".join(values) + "}",
        default=default,
        help=help,
    )


def arch_choice(flag: str, arches: Sequence[Arch]) -> Callable[[str], Arch | BadValue]:
    spellings = {text: arch for text, arch in ARCH_SPELLINGS.items() if arch in arches}
    return one_of(flag, spellings, arch_choices(arches))


def arch_choices(arches: Sequence[Arch]) -> str:
    """`arches` in words, each with its other spellings: "sm80 (or sm_80) or sm90 (or sm_90, sm_90a)"."""

    def spelled(arch: Arch) -> str:
        others = [text for text, a in ARCH_SPELLINGS.items() if a is arch and text != arch.value]
        return arch.value + (f" (or {', '.join(others)})" if others else "")

    words = [spelled(arch) for arch in arches]
    return ", ".join(words[:-1]) + " or " + words[-1] if len(words) > 1 else words[0]


def integer(flag: str, minimum: int) -> Callable[[str], int | BadValue]:
    def parse(text: str) -> int | BadValue:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            return BadValue(f"{flag}: expected an integer >= {minimum}, got {text!r}")
        return value

    return parse


def add_integer(
    parser: argparse.ArgumentParser, flag: str, minimum: int, default: int | None, help: str
) -> None:
    parser.add_argument(flag, type=integer(flag, minimum), default=default, help=help)


def number(flag: str, *, minimum: float) -> Callable[[str], float | BadValue]:
    def parse(text: str) -> float | BadValue:
        try:
            value = float(text)
        except ValueError:
            value = None
        if value is None or not value >= minimum:  # `not >=`: NaN is refused too
            return BadValue(f"{flag}: expected a number >= {minimum:g}, got {text!r}")
        return value

    return parse


class FlagProblems(ValueError):
    """Every problem of a command line's flags, each naming its flag."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(self.problems))
