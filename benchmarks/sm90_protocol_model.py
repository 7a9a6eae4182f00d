"""A model of the SM90 attention programs' barrier protocol, run on the CPU before a GPU sees it.

The producer and the consumers of `kernels/tl/attention_sm90.py` are written here as generators
over the barriers they share, and random interleavings of them are run over random persistent
schedules. Each consumer computes only the `seen` key tiles its rows see and passes the others
(`pass_tile`); with `seen` equal to the tile count for every consumer, every consumer computes
every tile (the protocol without skipping).

What it reports (a hang on the GPU costs a whole device call; a miscounted phase, wrong results):
- a deadlock: no process can move;
- an mbarrier arrival counted towards another phase than the one it is meant for (an early
  release of a K/V slot or of the Q tile);
- a parity wait on a barrier two phases ahead (the parity would name the wrong phase);
- a turn barrier completed by two arrivals without the consumer that waits on it.

    python benchmarks/sm90_protocol_model.py [SEED]

A run of 6,000 random cases (two and three consumers, persistent and not), no error;
mutants caught: a passed tile's K slot released before it has landed, and the Q tile released by
a consumer that sees nothing before it has landed.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Iterator

#: K/V ring stages (tiles.py: 2 for every SM90 program).
STAGES = 2
Process = Iterator[None]


class ProtocolError(Exception):
    pass


class MBarrier:
    """An mbarrier: a phase completes when `count` arrivals (TMA bytes count as the producer's)
    reach it; a parity wait for phase i passes once phase i has completed."""

    def __init__(self, name: str, count: int) -> None:
        self.name, self.count, self.completed, self.arrived = name, count, 0, 0

    def arrive(self, phase: int, who: object) -> None:
        if phase != self.completed:
            raise ProtocolError(
                f"{self.name}: {who} arrives for phase {phase}, the barrier is at {self.completed}"
            )
        self.arrived += 1
        if self.arrived == self.count:
            self.arrived, self.completed = 0, self.completed + 1

    def done(self, phase: int) -> bool:
        if self.completed >= phase + 2:
            raise ProtocolError(
                f"{self.name}: a wait for phase {phase} with {self.completed} completed (parity)"
            )
        return self.completed >= phase + 1


class TurnBarrier:
    """A named barrier of 256 threads: consumer c syncs on its own, consumer c - 1 arrives on it."""

    def __init__(self, name: str) -> None:
        self.name, self.arrivals, self.waiting = name, 0, False

    def arrive(self, who: object) -> None:
        self.arrivals += 1
        if self.arrivals >= 2 and not self.waiting:
            raise ProtocolError(f"{self.name}: two arrivals without its waiter ({who})")


def run(schedule: list[tuple[int, list[int]]], consumers: int, persistent: bool, rng: random.Random) -> None:
    """One CTA over `schedule`: (key tiles, key tiles each consumer sees) per query tile."""
    k_full = [MBarrier(f"k_full{i}", 1) for i in range(STAGES)]
    v_full = [MBarrier(f"v_full{i}", 1) for i in range(STAGES)]
    k_free = [MBarrier(f"k_free{i}", consumers) for i in range(STAGES)]
    v_free = [MBarrier(f"v_free{i}", consumers) for i in range(STAGES)]
    q_full, q_free = MBarrier("q_full", 1), MBarrier("q_free", consumers)
    turns = [TurnBarrier(f"turn{c}") for c in range(consumers)]

    def wait(barrier: MBarrier, phase: int) -> Process:
        while not barrier.done(phase):
            yield

    def take_turn(c: int) -> Process:
        turn = turns[c]
        turn.waiting = True
        while turn.arrivals < 1:
            yield
        turn.arrivals, turn.waiting = turn.arrivals - 1, False

    def hand_on(c: int) -> None:
        turns[(c + 1) % consumers].arrive(c)

    def producer() -> Process:  # produce_tile
        kbase = qround = 0
        for tiles, _ in schedule:
            if tiles > 0:
                if persistent:
                    yield from wait(q_free, qround - 1)
                q_full.arrive(qround, "producer")
            for k in range(tiles + 1):
                if k < tiles:
                    n = kbase + k
                    yield from wait(k_free[n % STAGES], n // STAGES - 1)
                    k_full[n % STAGES].arrive(n // STAGES, "producer")
                if k > 0:
                    n = kbase + k - 1
                    yield from wait(v_free[n % STAGES], n // STAGES - 1)
                    v_full[n % STAGES].arrive(n // STAGES, "producer")
            kbase, qround = kbase + tiles, qround + (tiles > 0)

    def consumer(c: int) -> Process:  # consume_all / consume_tile, attend_tile, pass_tile
        kbase = qround = 0
        if persistent and c == consumers - 1:
            turns[0].arrive("first turn")
        for tiles, seen_by in schedule:
            seen = seen_by[c]
            if tiles > 0:
                yield from wait(q_full, qround)
                if c == consumers - 1 and not persistent:
                    turns[0].arrive("first turn")
            if seen > 0:
                n = kbase
                yield from take_turn(c)
                yield from wait(k_full[n % STAGES], n // STAGES)
                hand_on(c)
                yield
                k_free[n % STAGES].arrive(n // STAGES, c)
                for k in range(1, seen):
                    n = kbase + k
                    yield from take_turn(c)
                    yield from wait(k_full[n % STAGES], n // STAGES)
                    yield from wait(v_full[(n - 1) % STAGES], (n - 1) // STAGES)
                    hand_on(c)
                    yield
                    k_free[n % STAGES].arrive(n // STAGES, c)
                    yield
                    v_free[(n - 1) % STAGES].arrive((n - 1) // STAGES, c)
                if persistent:
                    q_free.arrive(qround, c)
                n = kbase + seen - 1
                yield from wait(v_full[n % STAGES], n // STAGES)
                yield
                v_free[n % STAGES].arrive(n // STAGES, c)
            elif persistent and tiles > 0:
                q_free.arrive(qround, c)
            for k in range(seen, tiles):
                n = kbase + k
                yield from take_turn(c)
                hand_on(c)
                yield from wait(k_full[n % STAGES], n // STAGES)
                k_free[n % STAGES].arrive(n // STAGES, c)
                yield from wait(v_full[n % STAGES], n // STAGES)
                v_free[n % STAGES].arrive(n // STAGES, c)
            kbase, qround = kbase + tiles, qround + (tiles > 0)

    processes: dict[object, Process] = {"producer": producer(), **{c: consumer(c) for c in range(consumers)}}
    idle = 0
    while processes:
        name = rng.choice(list(processes))
        try:
            next(processes[name])
        except StopIteration:
            del processes[name]
            idle = 0
            continue
        idle += 1
        if idle > 20_000:
            raise ProtocolError(f"deadlock: {list(processes)} cannot move")


def random_schedule(rng: random.Random, consumers: int, persistent: bool) -> list[tuple[int, list[int]]]:
    schedule = []
    for _ in range(rng.randint(1, 5) if persistent else 1):
        tiles = rng.choice([0, 1, 2, 3, 5])
        schedule.append((tiles, [rng.randint(0, tiles) for _ in range(consumers)]))
    return schedule


def main() -> int:
    rng = random.Random(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
    cases = errors = 0
    for consumers in (2, 3):
        for persistent in (True, False):
            for _ in range(1500):
                schedule = random_schedule(rng, consumers, persistent)
                cases += 1
                try:
                    run(schedule, consumers, persistent, rng)
                except ProtocolError as error:
                    errors += 1
                    if errors <= 5:
                        print(f"{consumers} consumers, persistent={persistent}, {schedule}: {error}")
    print(f"{cases} random cases, {errors} errors")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
