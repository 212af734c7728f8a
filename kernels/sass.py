"""Read what the fused Bal-BCE kernel compiles to on sm_90 — on any machine, GPU or not.

Triton compiles for ``GPUTarget("cuda", 90, 32)`` without a GPU, and ships ``nvdisasm``. The argument list, constexprs,
layout and divisibility are those of the real launch (:func:`fastlivt.kernels.launch.launch_args` on meta tensors, specialised
as Triton's launcher specialises a real CUDA launch: 16-aligned pointers, integers divisible by 16, integers equal to 1).
From the SASS: the steady-state loop (the body between a label and the backward ``BRA`` to it that holds the logit loads),
its instruction count per logit (loop instructions / logits each thread handles per iteration), and the bit width of the
logit loads (``LDG`` with the evict-first hint) and of the gradient stores (``STG``).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from typing import Dict, List, Optional, Tuple

import torch

WIDTH = {"U8": 8, "S8": 8, "U16": 16, "S16": 16, "64": 64, "128": 128}
_INSN = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRA = re.compile(r"\bBRA\b.*`\((\.L_x_\d+)\)")


def nvdisasm_path() -> Optional[str]:
    import triton

    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    return bundled if os.path.exists(bundled) else shutil.which("nvdisasm")


def _specialize(value) -> Tuple[str, Optional[str]]:
    """(type, attribute key) as Triton's launcher specialises ``value`` (its own routine where present)."""
    from triton.runtime.jit import MockTensor

    arg = MockTensor(value.dtype) if isinstance(value, torch.Tensor) else value  # data_ptr 0: 16-aligned, as CUDA's
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend

        kind, key = native_specialize_impl(BaseBackend, arg, False, True, True)[:2]
        return kind, key
    except (ImportError, TypeError, AttributeError):  # another triton version: the same rules, written out
        return specialize_written_out(value)


def specialize_written_out(value) -> Tuple[str, Optional[str]]:
    """Triton's launch specialisation rules: pointers 16-aligned ("D"), integers equal to 1 constant, integers
    divisible by 16 marked ("D"), i32 unless out of range, Python floats fp32."""
    if isinstance(value, torch.Tensor):
        return "*" + {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64",
                      torch.int64: "i64", torch.int32: "i32"}[value.dtype], "D"
    if isinstance(value, bool):
        return "u1", None
    if isinstance(value, int):
        if value == 1:
            return "constexpr", 1
        return ("i32" if -2**31 <= value < 2**31 else "i64"), ("D" if value % 16 == 0 else "")
    return "fp32", None


def compile_sm90(n: int, c: int, dtype: torch.dtype, hard_labels: bool = False, fast: Optional[bool] = None,
                 config: Optional[Tuple[int, int]] = None, write_grad: bool = True) -> Tuple[bytes, Dict[str, object]]:
    """(cubin, launch facts) of the kernel as a CUDA launch for [N, C] ``dtype`` logits with a bias and mixup labels."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fastlivt.kernels import bal_bce
    from fastlivt.kernels.launch import launch_args, launch_config, use_asm

    meta = torch.device("meta")
    logits = torch.empty(n, c, dtype=dtype, device=meta)
    bias = torch.empty(c, dtype=torch.float32, device=meta)
    labels = torch.empty(n, dtype=torch.int64, device=meta)
    config = config or launch_config(n, c, interpret=False)

    def meta_table(b: torch.Tensor, cc: int, g: int, rows: int) -> Tuple[torch.Tensor, int]:
        length = ((rows * cc + g + 15) // 16) * 16
        return torch.empty(g, length, dtype=torch.float32, device=meta), length

    import fastlivt.kernels.launch as launch

    saved_check, saved_counter = launch.check_inputs, launch.counter_for
    launch.check_inputs = lambda *a: None  # meta tensors: nothing to check, no device counter
    launch.counter_for = lambda device: torch.empty(1, dtype=torch.int32, device=meta)
    try:
        args, constexprs, _, num_warps, _ = launch_args(logits, bias, labels, None if hard_labels else labels, 0.7, 0.1,
                                                        None, None, write_grad, 1.0, fast, config, meta_table, 1)
    finally:
        launch.check_inputs, launch.counter_for = saved_check, saved_counter
    constexprs = dict(constexprs, ASM=use_asm(constexprs["FAST"], interpret=False))
    kernel = bal_bce._bal_bce_kernel
    names = kernel.arg_names
    signature, attrs, consts = {}, {}, dict(constexprs)
    for i, (name, value) in enumerate(zip(names, args)):
        kind, key = _specialize(value)
        if kind == "constexpr":
            signature[name], consts[name] = "constexpr", value
        else:
            signature[name] = kind
            if key == "D":
                attrs[(i,)] = [["tt.divisibility", 16]]
    for name in constexprs:
        signature[name] = "constexpr"
    src = ASTSource(fn=kernel, signature=signature, constexprs=consts, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    facts = {"block": config[0], "num_warps": num_warps, "vector": constexprs["G"], "fast": constexprs["FAST"],
             "logits_per_thread_per_iter": config[0] // (32 * num_warps)}
    return compiled.asm["cubin"], facts


def disassemble(cubin: bytes) -> str:
    tool = nvdisasm_path()
    if tool is None:
        raise RuntimeError("nvdisasm not found (neither in triton/backends/nvidia/bin nor on PATH)")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as fh:
            fh.write(cubin)
        return subprocess.run([tool, "-c", path], capture_output=True, text=True, check=True).stdout


def loops(sass: str) -> List[List[str]]:
    """Every backward-branch loop: the instructions from a label up to the ``BRA`` that jumps back to it."""
    lines = sass.splitlines()
    label_at: Dict[str, int] = {}
    out = []
    for i, line in enumerate(lines):
        m = _LABEL.match(line.strip())
        if m:
            label_at[m.group(1)] = i
        b = _BRA.search(line)
        if b and b.group(1) in label_at:
            body = [_INSN.match(x).group(2) for x in lines[label_at[b.group(1)]:i + 1] if _INSN.match(x)]
            out.append(body)
    return out


def access_bits(opcode_line: str) -> int:
    """Bit width of an LDG/STG from its opcode: LDG.E.U16 -> 16, LDG.E -> 32, LDG.E.EF.128 -> 128."""
    op = opcode_line.split()[0] if not opcode_line.startswith("@") else opcode_line.split()[1]
    widths = [WIDTH[p] for p in op.split(".")[1:] if p in WIDTH]
    return widths[-1] if widths else 32


def _opcode(insn: str) -> str:
    parts = insn.split()
    return parts[1] if parts[0].startswith("@") else parts[0]


def analyse(sass: str, logits_per_thread_per_iter: int) -> Dict[str, object]:
    """Figures of the steady-state loop: the loop with evict-first loads (the logits) and stores (the gradient)."""
    candidates = [b for b in loops(sass) if any(_opcode(i).startswith("LDG") and ".EF" in _opcode(i) for i in b)]
    if not candidates:
        raise RuntimeError("no loop with evict-first loads (the logit loads) found in the SASS")
    body = max(candidates, key=len)
    loads = [i for i in body if _opcode(i).startswith("LDG") and ".EF" in _opcode(i)]
    stores = [i for i in body if _opcode(i).startswith("STG")]
    return {
        "loop_instructions": len(body),
        "instructions_per_logit": len(body) / logits_per_thread_per_iter,
        "logit_load_bits": min(access_bits(_opcode(i)) for i in loads),
        "grad_store_bits": min(access_bits(_opcode(i)) for i in stores) if stores else None,
        "mufu_per_logit": sum(_opcode(i).startswith("MUFU") for i in body) / logits_per_thread_per_iter,
    }


def sm90_figures(n: int, c: int, dtype: torch.dtype, **kw) -> Dict[str, object]:
    """Launch facts and steady-state loop figures of the kernel for [N, C] ``dtype`` logits on sm_90.

    Under ``TRITON_INTERPRET=1`` kernels are interpreted functions that do not compile: then a child process without
    it does the compilation."""
    from fastlivt.kernels.launch import interpreter_enabled

    if interpreter_enabled():
        import json
        import sys

        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
        code = ("import json, sys, torch; from fastlivt.kernels.sass import sm90_figures; a = json.loads(sys.argv[1]); "
                "print(json.dumps(sm90_figures(a['n'], a['c'], getattr(torch, a['dtype']), **a['kw'])))")
        spec = json.dumps({"n": n, "c": c, "dtype": str(dtype).replace("torch.", ""), "kw": kw})
        out = subprocess.run([sys.executable, "-c", code, spec], env=env, capture_output=True, text=True, timeout=600)
        if out.returncode != 0:
            raise RuntimeError(f"sm_90 compilation failed: {out.stderr.strip().splitlines()[-1:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])
    cubin, facts = compile_sm90(n, c, dtype, **kw)
    return {**facts, **analyse(disassemble(cubin), int(facts["logits_per_thread_per_iter"]))}
