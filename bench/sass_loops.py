#!/usr/bin/env python3
"""Opcode counts of the loops (backward branches) with at least 8 HMMA in a `cuobjdump -sass`
file: how many instructions a stream GEMM consumer spends per stage (bench/RESULTS.md section 36).

Usage: sass_loops.py FILE.sass
"""
import collections
import re
import signal
import sys

signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # quiet under `| head`


def main(path):
    code = []  # (address, instruction text)
    for line in open(path).read().splitlines():
        m = re.match(r'\s+/\*([0-9a-f]{4,})\*/\s+(.*?);', line)
        if m:
            code.append((int(m.group(1), 16), m.group(2).strip()))
    index = {addr: i for i, (addr, _) in enumerate(code)}
    for i, (addr, text) in enumerate(code):
        m = re.search(r'BRA (0x[0-9a-f]+)', text)
        if not m:
            continue
        target = int(m.group(1), 16)
        if target >= addr or target not in index:
            continue
        ops = collections.Counter()
        for _, body in code[index[target]:i + 1]:
            op = re.sub(r'^@!?U?P[0-9T]+\s+', '', body).split()[0].split('.')[0]
            ops[op] += 1
        if ops['HMMA'] >= 8:
            total = sum(ops.values())
            mix = ' '.join(f'{k}:{v}' for k, v in ops.most_common())
            print(f'loop {target:#x}-{addr:#x}: {total} instr; {mix}')


if __name__ == '__main__':
    main(sys.argv[1])
