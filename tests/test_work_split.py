"""How evenly one launch of the CUDA kernel spreads a step's work over the SMs: a model.

The kernel runs one block per tile (grid = n_tiles; kernels/adamw_kernel.cu). A tile is at most
TILE_ELEMS elements of one param on the param's 16-byte vector grid: tile j covers positions
u = phase + i in [j * TILE_ELEMS, (j + 1) * TILE_ELEMS) intersected with [phase, phase + numel)
(python/fused_adamw/_table.py tiles_of, kernels/adamw_tile.cuh tile_work).

The model:

* work of a block = the 16-byte vectors its tile touches (4 fp32 or 8 bf16 elements; a partial
  vector at a head or tail counts as one) + PER_BLOCK_COST. Every vector moves the same bytes
  (7 x 16, or 9 x 16 with amsgrad) whatever the dtype, so a vector is the time unit.
  PER_BLOCK_COST = 256 vector-times: the block's launch, the binary search over tile_starts,
  the row, step and hparams loads and the two powf of adamw_scalars, all dependent latency
  (~4.5 us at an H100's per-slot share of HBM, 3.35 TB/s / 528 slots x 112 B per vector) --
  1/16 of a full fp32 tile, 1/8 of a full bf16 tile;
* an SM holds RESIDENT blocks at once (4 of 256 threads: 64 registers; 3 for the HAS_MAX=true
  kernels: 85; tests/sass_check.py holds the kernel to those bounds), so the GPU has
  SMs x RESIDENT slots. Each slot runs one block at a time, at a fixed rate;
* blocks start in index order, each in the slot that becomes free first (ties: the lowest slot;
  slot k is on SM k mod SMs, so the first wave goes out breadth-first over the SMs, as the
  hardware's block scheduler does);
* an SM's time is when its last block ends. The ratio is the busiest SM's time over the
  average SM's time (1.0: every SM busy until the end). "makespan / ideal" is also shown: the
  last block's end over total work / slots (what perfect balance would take), which also
  counts the slots left idle in a last partial wave (in hardware the few blocks of such a
  tail run faster than their share, so it overstates the loss).

Gate: ratio <= 1.1 for every case of at least MIN_WAVES waves (blocks / slots) on an H100
(132 SMs) and an A100 (108 SMs). Smaller cases are reported, not gated. The old persistent
design (grid = SMs x RESIDENT, block b walks tiles b, b + G, b + 2G, ...) is modelled too, and
must fail where its split is uneven.

``python tests/test_work_split.py`` prints the table; ``--write-notes`` also writes it into
kernels/NOTES.md between the work-split markers.
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import random
import sys
from pathlib import Path

import pytest

from fused_adamw._table import TILE_ELEMS, tiles_of

NOTES = Path(__file__).resolve().parent.parent / "kernels" / "NOTES.md"
NOTES_BEGIN = "<!-- work-split-table:begin -->"
NOTES_END = "<!-- work-split-table:end -->"

PER_BLOCK_COST = 256  # vector-times per block (per tile in the persistent design)
LIMIT = 1.1
MIN_WAVES = 8
GPUS = {"H100": 132, "A100": 108}
RESIDENT = {False: 4, True: 3}  # blocks of 256 threads per SM, by HAS_MAX
ELEMS_PER_VECTOR = {"fp32": 4, "bf16": 8}


# ------------------------------------------------------------------------------------------
# layouts: (numel, phase) per param
# ------------------------------------------------------------------------------------------

def gpt2_small() -> list[int]:
    """GPT-2 small (124,439,808 params; lm_head tied to wte)."""
    d, v, ctx = 768, 50257, 1024
    sizes = [v * d, ctx * d]
    for _ in range(12):
        sizes += [d, d,                   # ln_1 weight, bias
                  d * 3 * d, 3 * d,       # attn c_attn
                  d * d, d,               # attn c_proj
                  d, d,                   # ln_2
                  d * 4 * d, 4 * d,       # mlp c_fc
                  4 * d * d, d]           # mlp c_proj
    return sizes + [d, d]                 # ln_f


def llm_7b() -> list[int]:
    """A 7B-like LLM (6,738,415,616 params): 32 layers of q, k, v, o 4096x4096, three MLP
    4096x11008, two norms; embed and lm_head 32000x4096, a final norm."""
    d, f, v = 4096, 11008, 32000
    sizes = [v * d]
    for _ in range(32):
        sizes += [d * d] * 4 + [d * f] * 3 + [d, d]
    return sizes + [d, v * d]


def small_tensors(n: int = 5000) -> list[int]:
    rng = random.Random(0)
    return [rng.randint(1024, 8192) for _ in range(n)]


def separate(sizes: list[int]) -> list[tuple[int, int]]:
    """Each param its own allocation: phase 0."""
    return [(n, 0) for n in sizes]


def packed(sizes: list[int], elems_per_vector: int) -> list[tuple[int, int]]:
    """Params back to back in one flat buffer (a DDP bucket): phases vary."""
    out, off = [], 0
    for n in sizes:
        out.append((n, off % elems_per_vector))
        off += n
    return out


LAYOUTS = {
    "GPT-2 small (124M)": lambda n: separate(gpt2_small()),
    "7B-like LLM": lambda n: separate(llm_7b()),
    "one 10M param": lambda n: separate([10_000_000]),
    "5000 x 1k-8k": lambda n: separate(small_tensors()),
    "5000 x 1k-8k, one flat buffer": lambda n: packed(small_tensors(), n),
}


# ------------------------------------------------------------------------------------------
# the model
# ------------------------------------------------------------------------------------------

def tile_vectors(params: list[tuple[int, int]], elems_per_vector: int) -> list[int]:
    """Vectors per tile, tiles in table order (rows in param order, a row's tiles in order)."""
    n = elems_per_vector
    out = []
    for numel, phase in params:
        for j in range(tiles_of(phase, numel)):
            u0 = max(j * TILE_ELEMS, phase)
            u1 = min((j + 1) * TILE_ELEMS, phase + numel)
            out.append(-(-u1 // n) - u0 // n)  # vectors [u0 // n, ceil(u1 / n))
    return out


def runs(durations: list[int]) -> list[tuple[int, int]]:
    """[(duration, count)] of consecutive equal durations."""
    out: list[list[int]] = []
    for d in durations:
        if out and out[-1][0] == d:
            out[-1][1] += 1
        else:
            out.append([d, 1])
    return [(d, c) for d, c in out]


def schedule(durations: list[int], sms: int, resident: int) -> list[int]:
    """Greedy list scheduling, blocks in index order, each to the slot free first (ties: the
    lowest slot). Returns each slot's end time (= its work: a slot is never idle before it)."""
    n_slots = sms * resident
    heap = [(0, k) for k in range(n_slots)]
    for d, count in runs(durations):
        rounds, rest = divmod(count, n_slots)
        if rounds:  # every slot takes `rounds` blocks; a uniform shift keeps the heap order
            heap = [(t + rounds * d, k) for t, k in heap]
        for _ in range(rest):
            t, k = heap[0]
            heapq.heapreplace(heap, (t + d, k))
    end = [0] * n_slots
    for t, k in heap:
        end[k] = t
    return end


@dataclasses.dataclass
class Split:
    ratio: float     # busiest SM's time / average SM's time
    makespan: float  # last end / (total work / slots)


def split_of(slot_end: list[int], sms: int) -> Split:
    sm_time = [0] * sms
    for k, t in enumerate(slot_end):
        sm_time[k % sms] = max(sm_time[k % sms], t)
    busiest = max(sm_time)
    return Split(busiest / (sum(sm_time) / sms), busiest / (sum(slot_end) / len(slot_end)))


def one_block_per_tile(tiles: list[int], sms: int, resident: int,
                       cost: int = PER_BLOCK_COST) -> Split:
    """This kernel: grid = n_tiles."""
    return split_of(schedule([v + cost for v in tiles], sms, resident), sms)


def persistent(tiles: list[int], sms: int, resident: int, cost: int = PER_BLOCK_COST) -> Split:
    """The old design: grid G = SMs x resident, block b takes tiles b, b + G, b + 2G, ..."""
    g = sms * resident
    blocks = [0] * g
    for i, v in enumerate(tiles):
        blocks[i % g] += v + cost
    return split_of(schedule(blocks, sms, resident), sms)


@dataclasses.dataclass
class Case:
    layout: str
    dtype: str
    has_max: bool
    gpu: str
    tiles: int
    waves: float
    split: Split
    old: Split

    @property
    def gated(self) -> bool:
        return self.waves >= MIN_WAVES


def cases() -> list[Case]:
    out = []
    for layout, make in LAYOUTS.items():
        for dtype, n in ELEMS_PER_VECTOR.items():
            tiles = tile_vectors(make(n), n)
            for has_max in (False, True):
                for gpu, sms in GPUS.items():
                    res = RESIDENT[has_max]
                    out.append(Case(layout, dtype, has_max, gpu, len(tiles),
                                    len(tiles) / (sms * res),
                                    one_block_per_tile(tiles, sms, res),
                                    persistent(tiles, sms, res)))
    return out


def table(rows: list[Case]) -> str:
    lines = ["| case | dtype | kernel | GPU (SMs x blocks) | tiles | waves | ratio | "
             "makespan / ideal | old persistent: ratio, makespan / ideal |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in rows:
        gate = ("**ok**" if c.split.ratio <= LIMIT else "**FAIL**") if c.gated else "(not gated)"
        lines.append(
            f"| {c.layout} | {c.dtype} | HAS_MAX={'true' if c.has_max else 'false'} | "
            f"{c.gpu} ({GPUS[c.gpu]} x {RESIDENT[c.has_max]}) | {c.tiles} | {c.waves:.2f} | "
            f"{c.split.ratio:.3f} {gate} | {c.split.makespan:.3f} | "
            f"{c.old.ratio:.3f}, {c.old.makespan:.3f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def all_cases() -> list[Case]:
    rows = cases()
    print("\n" + table(rows))
    return rows


def test_layout_sizes():
    assert sum(gpt2_small()) == 124_439_808
    assert sum(llm_7b()) == 6_738_415_616
    assert len(tile_vectors(separate([10_000_000]), 4)) == 611


def test_tile_vectors_match_the_tiling():
    """Vectors per tile: whole 16-byte vectors over the body, a partial one at a head or tail
    counts as one; tile boundaries sit on the vector grid."""
    t = TILE_ELEMS
    assert tile_vectors([(t, 0)], 4) == [t // 4]
    assert tile_vectors([(t + 1, 0)], 4) == [t // 4, 1]
    assert tile_vectors([(t, 3)], 4) == [t // 4, 1]          # head of 1 in tile 0, tail of 3
    assert tile_vectors([(5, 3)], 4) == [2]                   # [3, 8): two partial vectors
    assert tile_vectors([(2 * t - 6, 6)], 8) == [t // 8, t // 8]  # exactly two tiles
    for numel, phase in ((1, 0), (4097, 1), (3 * t + 5, 7), (100_003, 2)):
        assert len(tile_vectors([(numel, phase)], 8)) == tiles_of(phase, numel)


def test_schedule_is_greedy_list_scheduling():
    # 2 SMs x 1 slot: 3, 1 start at 0; the third block (2) goes to slot 1 (free at 1)
    assert schedule([3, 1, 2], 2, 1) == [3, 3]
    # batched rounds of equal blocks give the block-by-block answer
    durs = [5] * 1000 + [3] * 7 + [5] * 333 + [1] * 2
    slow = [(0, k) for k in range(24)]
    for d in durs:
        t, k = heapq.heappop(slow)
        heapq.heappush(slow, (t + d, k))
    assert schedule(durs, 6, 4) == [t for t, _ in sorted(slow, key=lambda x: x[1])]


def test_work_split_within_limit_from_8_waves(all_cases):
    gated = [c for c in all_cases if c.gated]
    assert {c.layout for c in gated} >= {"GPT-2 small (124M)", "7B-like LLM", "5000 x 1k-8k"}
    bad = [f"{c.layout} {c.dtype} HAS_MAX={c.has_max} {c.gpu}: {c.split.ratio:.3f}"
           for c in gated if c.split.ratio > LIMIT]
    assert not bad, "busiest SM / average SM > 1.1:\n" + "\n".join(bad)


def test_old_persistent_design_fails_the_model():
    """The model can fail: the persistent grid (SMs x 4 blocks, tiles dealt round robin)
    leaves one block with two tiles where all others have one."""
    h100 = GPUS["H100"]
    bucket = tile_vectors(separate([529 * TILE_ELEMS]), 4)  # a 529-tile bucket
    assert len(bucket) == 529
    assert persistent(bucket, h100, 4).ratio > LIMIT
    ten_m = tile_vectors(separate([10_000_000]), 4)  # 611 tiles over 528 blocks
    assert persistent(ten_m, h100, 4).ratio > LIMIT
    # and where this kernel's split passes (>= 8 waves), the persistent one need not
    small = tile_vectors(separate(small_tensors()), 4)
    assert one_block_per_tile(small, h100, 4).ratio <= LIMIT < persistent(small, h100, 4).ratio


# ------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------

def write_notes(text: str, path: Path = NOTES) -> None:
    block = (f"{NOTES_BEGIN}\n<!-- generated by `python tests/test_work_split.py --write-notes`;"
             f" do not edit by hand -->\n\n{text}\n\n{NOTES_END}")
    notes = path.read_text()
    if NOTES_BEGIN in notes and NOTES_END in notes:
        a, b = notes.index(NOTES_BEGIN), notes.index(NOTES_END) + len(NOTES_END)
        notes = notes[:a] + block + notes[b:]
    else:
        notes = notes.rstrip("\n") + "\n\n## Work split\n\n" + block + "\n"
    path.write_text(notes)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="the work-split model's table")
    ap.add_argument("--write-notes", action="store_true",
                    help=f"write the table into kernels/NOTES.md between {NOTES_BEGIN} and "
                         f"{NOTES_END}")
    args = ap.parse_args(argv)
    rows = cases()
    text = table(rows)
    print(text)
    bad = [c for c in rows if c.gated and c.split.ratio > LIMIT]
    print(f"\nper-block cost {PER_BLOCK_COST} vector-times; gated (>= {MIN_WAVES} waves): "
          f"{sum(c.gated for c in rows)} cases, {len(bad)} over {LIMIT}")
    if args.write_notes:
        write_notes(text)
        print("wrote kernels/NOTES.md")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
