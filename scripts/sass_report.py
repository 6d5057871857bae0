"""What each compiled kernel's loops issue, read from its sm_90 SASS (no GPU needed), and the budget
the attention kernels are held to.

On Hopper, wgmma runs asynchronously and every other instruction of an attention loop (masks,
scaling, address arithmetic, loop control) competes for the SM's 4 warp-instruction issue slots
per cycle, so the instructions a loop issues per unit of MMA work say how lean it is. This module
disassembles a cubin (``cuobjdump -sass``, bundled with Triton), finds its loops (the natural
loops of the control-flow graph: back edges to a block that dominates them), and reports per loop:
instructions by opcode class, MMA kind and shape (HGMMA = wgmma, HMMA = mma.sync), MMA FLOPs,
**instructions per kFLOP of MMA work, per warp** (an ``HGMMA.64xNxK`` is 2*64*N*K/4 FLOPs per
warp, an ``HMMA.16816`` 2*16*8*16: independent of unrolling and tile shape) and local
loads/stores. A loop counts the instructions of its body between its header and its latch, less
those of nested loops that hold MMA work (a GQA loop around a key loop counts only its own);
mbarrier polls inside count with it, and their out-of-line slow paths (after EXIT, taken only
while a wait is not yet satisfied) are reported apart. The **steady-state loop** is, of the loops
with MMA instructions, the one with the fewest instructions per kFLOP: the loop over full,
unmasked tiles that carries almost all the work at long lengths.

Beside it, a **static estimate, not a measurement**, per iteration of the steady-state loop of one
CTA on one SM: issue cycles (warp-instructions / 4), tensor cycles (fp16/bf16 wgmma at 4,096
FLOP/clk/SM, tf32 at half that) and MUFU cycles (16 lane-operations/clk/SM: 2 cycles per warp
instruction). It ignores latency, memory, co-resident CTAs and dual issue; it only says which
static resource bounds the loop.

The rules (``problems``, ``budget_problems``) are the CI budget of tests/test_compile_budget.py;
they live here, importable without side effects, and scripts/compile_check.py applies them too.
``scripts/compile_check.py --sass PATH`` runs the analysis on every recorded launch and writes the
report (docs/results/sass-sm90.json); ``python scripts/sass_report.py REPORT.json`` prints its
table; ``python scripts/sass_report.py --cubin K.cubin --warps 8`` analyses one cubin.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile

ESTIMATE = "static estimate, not a measurement"
TENSOR_FLOP_PER_CLK = {"F16": 4096, "BF16": 4096, "TF32": 2048}  # dense wgmma/mma per SM per cycle (sm_90)
ISSUE_PER_CLK = 4  # warp-instructions per SM per cycle (4 schedulers)
MUFU_CLK_PER_WARP_INST = 2  # 16 lane-operations per SM per cycle

# Opcode classes (the mnemonic before the first '.'); uniform-datapath instructions (U*) issue too.
CLASSES = {
    "mma": {"HGMMA", "HMMA", "IMMA", "QGMMA"},
    "mufu": {"MUFU"},
    "fp": {"FFMA", "FMUL", "FADD", "FMNMX", "FSEL", "FSETP", "FCHK", "FSWZADD", "FMNMX3", "FADD2", "FFMA2", "FMUL2",
           "HADD2", "HMUL2", "HFMA2", "HMNMX2"},
    "convert": {"F2F", "F2FP", "I2F", "F2I", "I2FP", "F2IP", "FRND"},
    "int": {"IMAD", "IADD3", "IADD", "VIADD", "LEA", "LOP3", "SHF", "ISETP", "IMNMX", "VIMNMX", "SEL", "IABS",
            "PRMT", "BMSK", "POPC", "FLO", "BREV", "IMUL", "ISCADD", "SGXT", "PLOP3", "P2R", "R2P", "LOP", "SHL",
            "SHR", "IDP", "IMNMX3", "VIMNMX3"},
    "move": {"MOV", "SHFL", "S2R", "CS2R", "S2UR", "R2UR", "R2B", "B2R", "MOVM"},
    "global": {"LDG", "STG", "LDGSTS", "LDGDEPBAR", "ATOM", "ATOMG", "RED", "REDG", "LD", "ST", "CCTL"},
    "tma": {"UTMALDG", "UTMASTG", "UTMAPF", "UTMACCTL", "UBLKCP", "UTMACMDFLUSH", "UTMAREDG"},
    "shared": {"LDS", "STS", "LDSM", "STSM", "ATOMS"},
    "local": {"LDL", "STL"},
    "sync": {"BAR", "WARPSYNC", "DEPBAR", "SYNCS", "WARPGROUP", "MEMBAR", "FENCE", "ELECT", "ARRIVES", "VOTE",
             "VOTEU", "ERRBAR", "CGAERRBAR", "MATCH"},
    "control": {"BRA", "EXIT", "BSSY", "BSYNC", "CALL", "RET", "JMP", "BRX", "YIELD", "NOP", "BPT"},
}
_CLASS_OF = {op: cls for cls, ops in CLASSES.items() for op in ops}

_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)((?:\.[A-Za-z0-9_]+)*)\s*([^;]*);")
_MMA_SHAPE = re.compile(r"\.(\d+)x(\d+)x(\d+)")
_HMMA_SHAPE = {"16816": (16, 8, 16), "1688": (16, 8, 8), "1684": (16, 8, 4), "884": (8, 8, 4)}


def tool(name: str) -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def disassemble(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool("cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout


def parse(sass: str):
    """[(address, mnemonic, suffixes, operands, predicated)] in address order."""
    return [(int(a, 16), op, sfx, args.strip(), bool(pred) and pred.strip() not in ("@PT", "@UPT"))
            for a, pred, op, sfx, args in _LINE.findall(sass)]


def opclass(op: str) -> str:
    if op in _CLASS_OF:
        return _CLASS_OF[op]
    return "uniform" if op.startswith("U") else "other"


def mma_of(op: str, sfx: str):
    """(kind, shape, FLOPs per warp, input type) of an MMA instruction, else None."""
    if op == "HGMMA":
        m, n, k = map(int, _MMA_SHAPE.search(sfx).groups())
        flops = 2 * m * n * k // 4  # a warpgroup (4 warps) computes the 64xNxK product together
    elif op == "HMMA":
        m, n, k = _HMMA_SHAPE[sfx.split(".")[1]]
        flops = 2 * m * n * k
    else:
        return None
    # The input type follows the accumulator type; fp16 inputs print none (HGMMA.64x64x16.F32).
    types = sfx.split(".")[2:]
    return op, f"{m}x{n}x{k}", flops, types[1] if len(types) > 1 else "F16"


def _blocks(insts):
    """Basic blocks {leader: [addresses]} and their successors {leader: [leaders]}."""
    addrs = [a for a, *_ in insts]
    nxt = dict(zip(addrs, addrs[1:]))
    jumps = {a: (int(re.match(r"`?\(?(?:0x)?([0-9a-f]+)", args).group(1), 16), pred)
             for a, op, _, args, pred in insts if op in ("BRA", "JMP")}
    ends = {a: pred for a, op, _, _, pred in insts if op in ("EXIT", "RET")}
    leaders = {addrs[0]} | {t for t, _ in jumps.values()} | {nxt[a] for a in (*jumps, *ends) if a in nxt}
    blocks = {}
    for a in addrs:
        if a in leaders:
            head = a
        blocks.setdefault(head, []).append(a)
    succ = {}
    for head, body in blocks.items():
        last = body[-1]
        if last in jumps:
            target, pred = jumps[last]
            out = [target, nxt.get(last)] if pred else [target]
        else:
            out = [] if last in ends and not ends[last] else [nxt.get(last)]
        succ[head] = [t for t in out if t in blocks]
    return blocks, succ


def find_loops(insts):
    """Natural loops of the control-flow graph: [(header, latch, body)], body the instruction addresses
    of the blocks that reach a back edge's source without passing the header. A back edge goes to a
    block that dominates its source, so the branch that returns from an out-of-line slow path (an
    mbarrier poll placed after EXIT) into the middle of a loop is none."""
    blocks, succ = _blocks(insts)
    preds = {b: [p for p in blocks if b in succ[p]] for b in blocks}
    entry = insts[0][0]
    dom = {b: set(blocks) for b in blocks}
    dom[entry] = {entry}
    changed = True
    while changed:
        changed = False
        for b in blocks:
            if b != entry and preds[b]:
                new = {b} | set.intersection(*(dom[p] for p in preds[b]))
                if new != dom[b]:
                    dom[b], changed = new, True
    loops = {}
    for b in blocks:
        for h in succ[b]:
            if h in dom[b] and (h != b or len(blocks[b]) > 1):  # not the trap after EXIT (BRA to itself)
                body, stack = {h, b}, [b] if b != h else []
                while stack:
                    for p in preds[stack.pop()]:
                        if p not in body:
                            body.add(p)
                            stack.append(p)
                _, latch, old = loops.get(h, (h, 0, set()))
                loops[h] = (h, max(latch, blocks[b][-1]), old | {a for blk in body for a in blocks[blk]})
    return sorted(loops.values(), key=lambda t: t[:2])


def analyze(cubin: bytes, num_warps: int) -> dict:
    """Loops, steady-state loop and static estimate of one compiled kernel. A loop's count is its
    body between header and latch (out-of-line slow paths, taken only while a wait is not yet
    satisfied, are counted apart), less nested loops that hold MMA work."""
    insts = parse(disassemble(cubin))
    info = {a: (op, sfx) for a, op, sfx, _, _ in insts}
    found = find_loops(insts)
    mma_bodies = [body for _, _, body in found if any(mma_of(*info[a]) for a in body)]
    loops = []
    for header, latch, body in found:
        mine = body - set().union(*(b for b in mma_bodies if b < body))
        inline = [info[a] for a in sorted(mine) if header <= a <= latch]
        classes = collections.Counter(opclass(op) for op, _ in inline)
        mma = collections.Counter(m for m in (mma_of(op, sfx) for op, sfx in inline) if m)
        flops = sum(count * m[2] for m, count in mma.items())
        loop = dict(start=hex(header), end=hex(latch), depth=sum(1 for _, _, b in found if body < b),
                    instructions=len(inline), out_of_line=len(mine) - len(inline),
                    classes=dict(classes.most_common()),
                    mma=[dict(kind=k, shape=s, dtype=t, count=c) for (k, s, _, t), c in sorted(mma.items())],
                    mma_flops_per_warp=flops,
                    inst_per_kflop=round(1000 * len(inline) / flops, 4) if flops else None,
                    ldl=sum(op == "LDL" for op, _ in inline), stl=sum(op == "STL" for op, _ in inline))
        loop["opcodes"] = collections.Counter(op for op, _ in inline)
        loops.append(loop)
    work = [lp for lp in loops if lp["mma_flops_per_warp"]]
    steady = min(work, key=lambda lp: lp["inst_per_kflop"]) if work else None
    for lp in loops:  # the opcode histogram of the steady-state loop; classes for the others
        opcodes = lp.pop("opcodes")
        if lp is steady:
            lp.update(steady_state=True, opcodes=dict(opcodes.most_common()))
    in_loops = set().union(*(body for _, _, body in found))
    ops = [op for op, _ in info.values()]
    return dict(loops=loops, mma_kinds=sorted({op for op, sfx in info.values() if mma_of(op, sfx)}),
                ldl=ops.count("LDL"), stl=ops.count("STL"),
                loop_ldl_stl=sum(info[a][0] in ("LDL", "STL") for a in in_loops),
                steady_state=None if steady is None else dict(
                    start=steady["start"], instructions=steady["instructions"],
                    mma_flops_per_warp=steady["mma_flops_per_warp"], inst_per_kflop=steady["inst_per_kflop"],
                    estimate=static_estimate(steady, num_warps)))


def static_estimate(loop: dict, num_warps: int) -> dict:
    """Per iteration of the loop, one CTA (num_warps warps) on one SM: issue, tensor and MUFU cycles."""
    rate = min((TENSOR_FLOP_PER_CLK.get(m["dtype"], 0) for m in loop["mma"]), default=0)
    issue = loop["instructions"] * num_warps / ISSUE_PER_CLK
    tensor = loop["mma_flops_per_warp"] * num_warps / rate if rate else None
    mufu = loop["classes"].get("mufu", 0) * num_warps * MUFU_CLK_PER_WARP_INST
    bound = max(("issue", issue), ("tensor", tensor or 0), ("mufu", mufu), key=lambda t: t[1])[0]
    return dict(label=ESTIMATE, issue_cycles=issue, tensor_cycles=tensor, mufu_cycles=mufu, bound=bound)


# ---------------------------------------------------------------------------- the rules
ATTENTION = ("attention forward", "attention backward dK/dV", "attention backward dQ")
SHARED_LIMIT = {90: 232448, 80: 166912}  # bytes per block (opt-in maximum)
# The budget (docs/kernels.md, tests/test_compile_budget.py). Instructions per kFLOP of MMA work, per
# warp, in the steady-state loop of the forward, dK/dV and dQ kernels, by BLOCK_D: the anchor figures
# of a Triton-tutorial-style FlashAttention-2 compiled the same way (DESIGN.md section 3, turn 3).
BUDGET = {("attention forward", 64): 1.16, ("attention forward", 128): 0.70,
          ("attention backward dK/dV", 64): 0.65, ("attention backward dK/dV", 128): 0.40,
          ("attention backward dQ", 64): 0.66, ("attention backward dQ", 128): 0.41}
# The Triton release the tile lists were chosen and the budget checked on (setup.py's test extra pins
# it): the instruction counts move with the compiler, so other releases are reported against the
# budget, held only to the resource rules (problems).
BUDGET_TRITON = (3, 9)
OTHER_CONFIGS = 1.25  # listed configs besides the pinned (first) and the best one: within 1.25x of the budget
SPILL_ALLOWANCE = 256  # B/thread for the budgeted variants, never inside a loop; every other variant: none


def budgeted(record) -> bool:
    """Held to the instruction budget, wgmma only and the spill allowance: the half-precision forward,
    dK/dV and dQ variants of head_dim 64-128 (head_dim 256 and the rest must not spill at all)."""
    return record["default_path"] and (record["kernel"], record.get("block_d")) in BUDGET


def problems(record, arch) -> list[str]:
    """Why a record fails the resource rules (empty when it passes); the instruction budget, which
    compares the configs of a list, is budget_problems."""
    if "error" in record:
        return [f"does not compile: {record['error']}"]
    out = []
    limit = SHARED_LIMIT.get(arch, 101376)
    if record["shared"] > limit:
        out.append(f"shared memory {record['shared']} B > {limit} B")
    if record["default_path"]:
        allowance = SPILL_ALLOWANCE if budgeted(record) else 0
        if record["spill_bytes"] > allowance:
            out.append(f"spills {record['spill_bytes']} B/thread (> {allowance})")
        if record["sass"]["loop_ldl_stl"]:
            out.append(f"{record['sass']['loop_ldl_stl']} local loads/stores inside loops")
    if budgeted(record) and record["sass"]["mma_kinds"] != ["HGMMA"]:
        out.append(f"MMA {record['sass']['mma_kinds']}, not wgmma only")
    return out


def budget_problems(records) -> list[str]:
    """Steady-state loops over the instruction budget: per kernel, dtype, BLOCK_D and load path, the
    pinned (rank 0) and the best config at or below it, every other listed config within 1.25x."""
    groups = {}
    for r in records:
        if "error" not in r and budgeted(r):
            groups.setdefault((r["kernel"], r["dtype"], r["block_d"], r.get("use_tma")), []).append(r)
    out = []
    for (kernel, dtype, block_d, tma), group in sorted(groups.items()):
        budget = BUDGET[(kernel, block_d)]
        best = min(group, key=steady_figure)
        for r in group:
            limit = budget if r is best or r["rank"] == 0 else OTHER_CONFIGS * budget
            if steady_figure(r) > limit:
                out.append(f"{kernel} {dtype} BLOCK_D {block_d} tma={tma} M{r['block_m']} N{r['block_n']} "
                           f"w{r['warps']} s{r['stages']}: {steady_figure(r)} inst/kFLOP > {limit:.3f}")
    return out


def steady_figure(record):
    """Instructions per kFLOP of the steady-state loop, or None (no MMA loop, or no compile)."""
    steady = (record.get("sass") or {}).get("steady_state")
    return steady and steady["inst_per_kflop"]


def table(records) -> str:
    """One line per analysed launch: kernel, dtype, dims, tile, steady-state figure and estimate."""
    lines = [f"{'kernel':30s} {'dtype':5s} {'d':>7s} {'tile':18s} {'flags':22s} {'inst/kFLOP':>10s} "
             f"{'issue':>7s} {'tensor':>7s} {'mufu':>6s} mma   ({ESTIMATE} for the cycles)"]
    for r in records:
        s = (r.get("sass") or {}).get("steady_state")
        if s is None:
            continue
        e = s["estimate"]
        tile = f"M{r.get('block_m', r.get('block_r', '-'))} N{r.get('block_n', '-')} w{r['warps']} s{r['stages']}"
        flags = "tma" if r.get("use_tma") else "pointers"
        lines.append(f"{r['kernel']:30s} {r['dtype']:5s} {'/'.join(map(str, r['head_dims'])):>7s} {tile:18s} "
                     f"{flags:22s} {s['inst_per_kflop']:10.3f} {e['issue_cycles']:7.0f} "
                     f"{e['tensor_cycles'] or 0:7.0f} {e['mufu_cycles']:6.0f} {','.join(r['sass']['mma_kinds'])}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", nargs="?", help="a JSON written by compile_check.py --sass")
    parser.add_argument("--cubin", help="analyse one cubin instead")
    parser.add_argument("--warps", type=int, default=4, help="num_warps of --cubin")
    args = parser.parse_args(argv)
    if args.cubin:
        with open(args.cubin, "rb") as f:
            print(json.dumps(analyze(f.read(), args.warps), indent=1))
        return 0
    with open(args.report) as f:
        print(table(json.load(f)["records"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
