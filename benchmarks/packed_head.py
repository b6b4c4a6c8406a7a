"""The vocabulary decoder on a CPU: torch's F.linear vs the weight prepacked by oneDNN (packed_linear.py).

    python benchmarks/packed_head.py [--json] [--vocab 256000] [--hidden 768] [--rows 1,4,16,32,128]
        [--dtypes fp32,bf16] [--repeats 7]

The mmBERT-base decoder's shape (random weights): logits [rows, vocab] from hidden states [rows,
hidden], as a sampling step computes them at a block's masks (16 masks on average for blocks of
32 at one token per step; the exact sampler's head has as many rows as the cached one). Per dtype
and row count, the two calls alternate, `--repeats` times each, and the medians are compared
(speedup = F.linear's time / packed time). Also reported: the largest difference of either from a
float64 reference, and whether each row's logits are bitwise the same as when computed among 64 rows
(batch invariance: a request's tokens should not depend on its company), and what keying the packed
copy on its weight's content would add to each call: one pass over the weight (`fingerprint_ms`, a
float sum: the least any content check costs, timed alternating with the two calls) and the speed-up
left with it (`speedup_with_fingerprint` = F.linear's time / (packed + fingerprint)). The last line
of --json is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def invariant(linear, together, outputs, rows: int) -> bool | None:
    """Are the first `rows` of `together` alone given the outputs they get among all of them?"""
    if rows >= together.shape[0]:
        return None
    return bool(linear(together[:rows]).equal(outputs[:rows]))


def compare(plain, packed, x, together, repeats: int) -> dict:
    """F.linear (`plain`) vs the packed weight (`packed`) on inputs x [rows, hidden] (float64, cast)."""
    import torch

    dtype = together.dtype
    xd = x.to(dtype)
    plain(xd), packed(xd), plain.weight.sum()  # warm-up
    plain_times, packed_times, fingerprint_times = [], [], []
    for _ in range(repeats):  # alternating: all see the same load
        plain_times.append(timed(lambda: plain(xd)))
        packed_times.append(timed(lambda: packed(xd)))
        fingerprint_times.append(timed(lambda: plain.weight.sum()))
    reference = plain.reference(xd)
    rows = x.shape[0]
    with torch.no_grad():
        return {
            "rows": rows,
            "f_linear_ms": statistics.median(plain_times) * 1000,
            "packed_ms": statistics.median(packed_times) * 1000,
            "speedup": statistics.median(plain_times) / statistics.median(packed_times),
            "fingerprint_ms": statistics.median(fingerprint_times) * 1000,
            "speedup_with_fingerprint": statistics.median(plain_times)
            / (statistics.median(packed_times) + statistics.median(fingerprint_times)),
            "f_linear_max_error": float((plain(xd).double() - reference).abs().max()),
            "packed_max_error": float((packed(xd).double() - reference).abs().max()),
            "f_linear_batch_invariant": invariant(plain, together, plain(together), rows),
            "packed_batch_invariant": invariant(packed, together, packed(together), rows),
        }


class Plain:
    """F.linear, as the model's nn.Linear runs it."""

    def __init__(self, weight, bias):
        import torch.nn.functional as F

        self.linear, self.weight, self.bias = F.linear, weight, bias

    def __call__(self, x):
        return self.linear(x, self.weight, self.bias)

    def reference(self, x):
        """float64 from the inputs as the dtype sees them"""
        return self.linear(x.double(), self.weight.double(), self.bias.double())


class Packed:
    """The weight packed once, as the sampler's decoder runs it."""

    def __init__(self, weight, bias):
        from diffutron.packed_linear import pack, packed_linear

        self.linear, self.packed, self.bias = packed_linear, pack(weight), bias

    def __call__(self, x):
        return self.linear(x, self.packed, self.bias)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--vocab", type=int, default=256000)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--rows", default="1,4,16,32,128")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    import torch

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    report = {"vocab": args.vocab, "hidden": args.hidden, "threads": torch.get_num_threads(), "table": []}
    out = sys.stderr if args.json else sys.stdout
    g = torch.Generator().manual_seed(0)
    weight64 = torch.randn(args.vocab, args.hidden, generator=g, dtype=torch.float64) / args.hidden**0.5
    bias64 = torch.randn(args.vocab, generator=g, dtype=torch.float64) / 10
    together = torch.randn(64, args.hidden, generator=g, dtype=torch.float64)
    from diffutron.packed_linear import _bf16_supported

    with torch.no_grad():
        for name in args.dtypes.split(","):
            if dtypes[name] == torch.bfloat16 and not _bf16_supported():
                print("bf16: skipped, oneDNN has no bf16 on this CPU (it needs avx512 or avx_ne_convert)", file=out)
                report.setdefault("skipped", []).append(name)
                continue
            weight, bias = weight64.to(dtypes[name]), bias64.to(dtypes[name])
            plain, packed = Plain(weight, bias), Packed(weight, bias)
            for rows in (int(r) for r in args.rows.split(",")):
                x = torch.randn(rows, args.hidden, generator=g, dtype=torch.float64)
                row = {"dtype": name, **compare(plain, packed, x, together.to(weight.dtype), args.repeats)}
                report["table"].append(row)
                print(
                    f"{name} {rows:>4} rows: F.linear {row['f_linear_ms']:7.1f} ms  packed {row['packed_ms']:7.1f} ms"
                    f"  -> {row['speedup']:.2f}x  (+ fingerprint {row['fingerprint_ms']:.1f} ms: "
                    f"{row['speedup_with_fingerprint']:.2f}x)   max error {row['f_linear_max_error']:.1e} / "
                    f"{row['packed_max_error']:.1e}   batch-invariant {row['f_linear_batch_invariant']} / "
                    f"{row['packed_batch_invariant']}",
                    file=out,
                    flush=True,
                )
            del plain, packed
    if args.json:
        print(json.dumps(report))


if __name__ == "__main__":
    main()
