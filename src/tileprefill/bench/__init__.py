"""`python -m tileprefill bench`: our Ops against torch SDPA and TileOPs, in one run on one machine.

- `cases`: every benchmark case, FLOP counts and input tensors (stdlib + torch only: the
  peer process loads it by path);
- `runner`: prebuild, timing of ours and SDPA, the output check, the run;
- `peer`: TileOPs in its own process (`benchmarks/bench_peer.py`);
- `results`, `report`: the data of a run and its JSON, markdown and plots.

Importing this package imports neither tilelang, triton nor matplotlib.
"""
