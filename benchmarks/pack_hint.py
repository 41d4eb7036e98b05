"""The products of one decode step under each weight layout: ``python -m benchmarks.pack_hint``.

`safety_decoding.fused.Projection` prepacks every weight for oneDNN with a rows hint
(`fused.PACK_ROWS_HINT`). This times all the matrix products of one decode step of the base
model's shapes (every layer's q/k/v, o, gate/up and down, and the LM head), with random weights
of the same shapes, at several row counts (1: one sequence; 2: one sequence and its ``[CLS]``
probe; 16: eight sequences with probes), for each hint, for ``F.linear`` on the plain layout and
for the int8 weights of ``ESS_QUANTIZATION=int8`` (fbgemm's dynamic product).
The weights total more than the CPU's caches, as in a real step. Prints a table (milliseconds per
step, lower is better) and writes JSON.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import markdown_table, write_json
from safety_decoding.fused import Projection
from safety_decoding.types import Quantization

HINTS = (1, 2, 8, 16, 32)
ROWS = (1, 2, 8, 16)


def step_shapes(config) -> list[tuple[int, int]]:
    """``(out, in)`` of every product of a decode step, fused as `fused.FusedLayer` fuses them."""
    H, inter, D = config.hidden_size, config.intermediate_size, config.head_dim
    qkv = (config.num_attention_heads + 2 * config.num_key_value_heads) * D
    layer = [(qkv, H), (H, config.num_attention_heads * D), (2 * inter, H), (H, inter)]
    return layer * config.num_hidden_layers + [(config.vocab_size, H)]


def time_ms(fn, reps: int) -> float:
    fn()  # warm-up
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps * 1000


def plain(w: torch.Tensor):
    """``x -> x @ w.T`` on the plain layout."""
    return lambda x: torch.nn.functional.linear(x, w)


def onednn(hint: int):
    """A builder: ``w ->`` the product with ``w`` packed for oneDNN for ``hint`` rows."""
    def build(w: torch.Tensor):
        packed = torch.ops.mkldnn._reorder_linear_weight(w, hint)
        return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    return build


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", default="benchmarks/results/pack_hint.json")
    args = ap.parse_args(argv)

    from transformers import AutoConfig

    from safety_decoding.base_model import prepare_base_model

    torch.manual_seed(0)
    shapes = step_shapes(AutoConfig.from_pretrained(str(prepare_base_model())))
    weights = [torch.randn(o, i) for o, i in shapes]
    layouts = {"F.linear": plain} | {f"oneDNN hint {h}": onednn(h) for h in HINTS} | {
        "fbgemm int8 (ESS_QUANTIZATION=int8)": lambda w: Projection(w, None, Quantization.INT8)}
    ms = {name: {} for name in layouts}
    with torch.inference_mode():
        for name, build in layouts.items():
            products = [(w.shape[1], build(w)) for w in weights]
            for rows in ROWS:
                xs = {i: torch.randn(rows, i) for _, i in shapes}
                ms[name][rows] = round(time_ms(lambda: [f(xs[i]) for i, f in products], args.reps), 1)
            products = None  # free before the next layout is packed
    print(markdown_table(["layout"] + [f"{r} rows (ms)" for r in ROWS],
                         [[name] + [ms[name][r] for r in ROWS] for name in layouts]))
    out = {"dtype": "float32", "threads": torch.get_num_threads(), "reps": args.reps,
           "parameters": sum(o * i for o, i in shapes), "ms_per_step": ms}
    write_json(args.json, out)
    return out


if __name__ == "__main__":
    main()
