"""`python -m tileprefill bench`: our Ops against torch SDPA, TileOPs and FlashInfer, in one run on one
machine.

- `cases`: what a case is, its FLOPs, input tensors and reference rows (stdlib + torch only: the
  peer processes load it by path);
- `catalogue`: the default set, its quick subset, the tiny CPU cases; `scoreboard`: the scoreboard;
- `calls`: our Ops on a case; `sdpa`: SDPA on the equivalent dense problem;
- `timing`: timers, progress, the deadline and the estimate of a run;
- `runner`: prebuild, timing of ours and SDPA, the run; `merging`: --merge and --resume;
- `peer`: TileOPs and FlashInfer, each in its own process (`benchmarks/bench_peer.py`,
  `benchmarks/bench_flashinfer_peer.py`);
- `results`, `summary`, `report`: the data of a run, the figures it is judged by, its JSON, markdown
  and plots.

Importing this package imports neither tilelang, triton nor matplotlib.
"""
