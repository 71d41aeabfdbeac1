"""A small interpreter for the straight-line PTX our Triton kernels inline (CPU tests of the PTX).

Registers hold raw bit patterns (Python ints); f16x2 / f32 instructions view them as numpy
float16 pairs / float32 and round once per instruction, as the hardware does (an fma is computed
in float64, exact for these operand widths, then rounded). ``ld.global`` reads 32-bit words
from ``mem`` (a dict address -> word). Only the instructions the kernels use are known; anything
else fails loudly.
"""
from __future__ import annotations

import re

import numpy as np

M32 = 0xFFFFFFFF


def _h2(w):
    return np.array([w & 0xFFFF, (w >> 16) & 0xFFFF], dtype=np.uint16).view(np.float16).astype(np.float64)


def _w2(v):
    u = np.asarray(v, dtype=np.float64).astype(np.float16).view(np.uint16)
    return int(u[0]) | (int(u[1]) << 16)


def _f(w):
    return float(np.array([w & M32], dtype=np.uint32).view(np.float32)[0])


def _fw(v):
    return int(np.array([v], dtype=np.float64).astype(np.float32).view(np.uint32)[0])


def _prmt(a, b, sel):
    src = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
    out = 0
    for i in range(4):
        nib = (sel >> (4 * i)) & 0xF
        byte = src[nib & 7]
        if nib & 8:  # sign-replicate mode
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * i)
    return out


def _lop3(a, b, c, lut):
    out = 0
    for bit in range(32):
        idx = (((a >> bit) & 1) << 2) | (((b >> bit) & 1) << 1) | ((c >> bit) & 1)
        out |= ((lut >> idx) & 1) << bit
    return out


def parse(asm: str) -> list:
    prog = []
    for line in asm.split("\n"):
        line = line.strip()
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        prog.append((op, rest.rstrip(";").strip()))
    return prog


def run(prog, regs: dict, mem: dict | None = None) -> dict:
    """Execute ``prog`` (from ``parse``) with operand registers ``regs`` ($n -> bit pattern)."""
    r = dict(regs)

    def val(x):
        x = x.strip()
        return r[x] if x in r else int(x, 0) & 0xFFFFFFFFFFFFFFFF

    for op, rest in prog:
        if rest.startswith("{"):  # vector destination: mov unpack or ld.v4
            dst = [d.strip() for d in rest[1:rest.index("}")].split(",")]
            src = rest[rest.index("}") + 1:].strip().lstrip(",").strip()
            if op == "mov.b32":
                v = val(src)
                r[dst[0]], r[dst[1]] = v & 0xFFFF, (v >> 16) & 0xFFFF
            elif op == "ld.global.nc.v4.u32":
                m = re.fullmatch(r"\[(\S+?)(?:\+(\d+))?\]", src)
                addr = val(m.group(1)) + int(m.group(2) or 0)
                for i, d in enumerate(dst):
                    r[d] = mem[addr + 4 * i]
            else:
                raise NotImplementedError(op)
            continue
        a = [x.strip() for x in rest.split(",")]
        if op == "mov.b32" and a[1].startswith("{"):
            raise NotImplementedError(line)
        if op in ("mov.b32", "mov.b64"):
            v = val(a[1])
        elif op == "add.s64":
            v = (val(a[1]) + val(a[2])) & 0xFFFFFFFFFFFFFFFF
        elif op == "mul.hi.u32":
            v = ((val(a[1]) & M32) * (val(a[2]) & M32)) >> 32
        elif op == "mad.lo.u32":
            v = ((val(a[1]) & M32) * (val(a[2]) & M32) + (val(a[3]) & M32)) & M32
        elif op == "and.b32":
            v = val(a[1]) & val(a[2])
        elif op == "shr.b32":
            v = (val(a[1]) & M32) >> val(a[2])
        elif op == "shl.b32":
            v = (val(a[1]) << val(a[2])) & M32
        elif op == "prmt.b32":
            v = _prmt(val(a[1]), val(a[2]), val(a[3]))
        elif op == "lop3.b32":
            v = _lop3(val(a[1]), val(a[2]), val(a[3]), val(a[4]))
        elif op == "sub.f16x2":
            v = _w2(_h2(val(a[1])) - _h2(val(a[2])))
        elif op == "mul.f16x2":
            v = _w2(_h2(val(a[1])) * _h2(val(a[2])))
        elif op == "fma.rn.f16x2":
            v = _w2(_h2(val(a[1])) * _h2(val(a[2])) + _h2(val(a[3])))
        elif op == "cvt.f32.f16":
            v = _fw(float(np.array([val(a[1])], dtype=np.uint16).view(np.float16)[0]))
        elif op == "add.f32":
            v = _fw(_f(val(a[1])) + _f(val(a[2])))
        elif op == "mul.f32":
            v = _fw(_f(val(a[1])) * _f(val(a[2])))
        elif op == "fma.rn.f32":
            v = _fw(_f(val(a[1])) * _f(val(a[2])) + _f(val(a[3])))
        else:
            raise NotImplementedError(op)
        r[a[0]] = v
    return r
