#!/usr/bin/env python3
"""Summarise an Nsight Compute source-page CSV per kernel (what bench/RESULTS.md section 9 used).

  ncu --page source --print-source sass --csv --section SourceCounters --section WarpStateStats \
      [--warp-sampling-interval 0] --kernel-name regex:moejit_gemm ... > out.csv
  bench/ncu_source_regions.py out.csv [MIN_PERCENT]

For each kernel: total stall samples and executed warp instructions, then every run of
consecutive SASS instructions with the same execution count (a basic block, roughly) holding at
least MIN_PERCENT (default 1) of the samples, with its share, instructions executed, marker
opcodes (TRYWAIT, LDGSTS, HMMA, BAR.SYNC, ...) and its three largest stall reasons.
"""
import csv
import sys

MARKS = ["TRYWAIT", "NANOSLEEP", "LDGSTS", "HMMA", "BAR.SYNC", "ARRIVE", "LDSM", "STG", "LDG",
         "SHFL", "FFMA", "REDUX", "ATOMS"]


def kernels(path):
    cur, hdr = None, None
    with open(path) as f:
        for line in f:
            if line.startswith('"Kernel Name"'):
                cur = {"name": next(csv.reader([line]))[1], "rows": [], "hdr": None}
                hdr = None
                yield cur
            elif line.startswith('"Address"') and cur is not None:
                hdr = next(csv.reader([line]))
                cur["hdr"] = hdr
            elif hdr and line.startswith('"0x'):
                cur["rows"].append(next(csv.reader([line])))


def main():
    path = sys.argv[1]
    min_pct = float(sys.argv[2]) if len(sys.argv) > 2 else 1.0
    for k in list(kernels(path)):  # the generator fills each kernel after yielding it
        rows, hdr = k["rows"], k["hdr"]
        if not rows:
            continue
        col = {h: i for i, h in enumerate(hdr)}
        samples, executed = col["Warp Stall Sampling (All Samples)"], col["Instructions Executed"]
        stalls = [h for h in hdr if h.startswith("stall_") and "Not Issued" not in h]
        total = sum(int(r[samples]) for r in rows) or 1
        print(f"===== {k['name']}: {total} samples, "
              f"{sum(int(r[executed]) for r in rows)} warp instructions")
        start = 0
        for i in range(1, len(rows) + 1):
            if i < len(rows) and rows[i][executed] == rows[start][executed]:
                continue
            block = rows[start:i]
            s = sum(int(r[samples]) for r in block)
            if 100.0 * s / total >= min_pct:
                agg = sorted(((sum(int(r[col[h]]) for r in block), h[6:]) for h in stalls),
                             reverse=True)[:3]
                marks = [m for m in MARKS if any(m in r[1] for r in block)]
                ex = int(block[0][executed])
                print(f"{start:5d}-{i - 1:5d} n={len(block):4d} samples={s:7d} "
                      f"({100.0 * s / total:4.1f}%) executed={ex * len(block):11d} {marks} {agg}")
            start = i


if __name__ == "__main__":
    main()
