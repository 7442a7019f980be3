"""W8A16's decode speed and the minor page faults its weight copies take, in one fresh process.

W8A16Linear (Lesson 3) casts its int8 weight to a float copy at every call. Where glibc places
those copies decides whether each call touches fresh pages: run this script under different
allocator settings and compare, e.g.

    python benchmarks/w8a16_page_faults.py
    MALLOC_TRIM_THRESHOLD_=4294967296 python benchmarks/w8a16_page_faults.py

(the second freezes glibc's mmap threshold at 128 KiB, so every copy is a fresh mmap). CONTRIBUTING.md,
"Verification design", records what it printed. Never run it beside another timed job.
"""

import argparse
import copy
import os
import resource
import statistics
import time

import torch

import helper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=helper.DECODE_TOKENS)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    model, tokenizer = helper.load_smollm2(torch.float32)
    w8a16 = helper.replace_linear_with_w8a16(copy.deepcopy(model))
    batch = tokenizer("The history of", return_tensors="pt")
    kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    models = {"fp32": model, "W8A16": w8a16}
    for m in models.values():  # warm-up
        m.generate(**batch, **kwargs)
    seconds, faults = {n: [] for n in models}, {n: [] for n in models}
    for _ in range(args.rounds):  # interleaved rounds, as helper.decode_timings does
        for name, m in models.items():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            m.generate(**batch, **kwargs)
            seconds[name].append(time.perf_counter() - start)
            faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    settings = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")} or "glibc's defaults"
    ratio = statistics.median(seconds["fp32"]) / statistics.median(seconds["W8A16"])
    print(
        f"allocator: {settings}; {args.new_tokens} tokens x {args.rounds} rounds: W8A16 {ratio:.2f}x fp32; "
        f"minor page faults per round (median): fp32 {statistics.median(faults['fp32']):,.0f}, "
        f"W8A16 {statistics.median(faults['W8A16']):,.0f}"
    )


if __name__ == "__main__":
    main()
