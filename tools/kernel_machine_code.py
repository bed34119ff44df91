"""Digests of the Adam kernel's machine code for sm_90, compiled offline (no GPU needed).

A change that must not move the kernels' GPU times (a restructuring of their Python side, say) should
leave the machine code as it was. This compiles ``_multi_tensor_adam_kernel`` for every configuration
the optimizers launch (param dtype x moment storage x the flags of the drop-ins and of ALSO's passes)
with Triton's bundled ptxas, disassembles it with nvdisasm and hashes the instructions (line-table
comments dropped, so that moving source lines does not count), each compiled afresh (an empty Triton
cache). Compare the output of two versions of the code, e.g. with an earlier one copied as a package of
another name (its imports are relative)::

    python tools/kernel_machine_code.py > new.json
    PYTHONPATH=old python tools/kernel_machine_code.py --package also_fused_old > old.json
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="kernel_machine_code_")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

mta = None  # the kernel module of the package given on the command line

POINTERS = {"chunks_ptr": "*i64", "meta_ptr": "*i64", "grads_ptr": "*i64", "hyper_ptr": "*fp32",
            "error_ptr": "*i32", "tickets_ptr": "*i32", "report_ptr": "*i32"}
DTYPES = {"fp32": (tl.float32, 4), "bf16": (tl.bfloat16, 2)}
# (name, flags) of the passes the optimizers launch
PASSES = {
    "adamw": dict(EPS_TORCH=True, DECOUPLED=True),
    "adam-amsgrad-maximize": dict(EPS_TORCH=True, AMSGRAD=True, MAXIMIZE=True),
    "also": dict(),
    "also-extrapolate": dict(EXTRAP=True, REPORT=True),
    "also-closure-extrapolate": dict(SAVE_SRC=True, COMMIT=False),
    "also-closure-main": dict(PRIOR=True, SAVE_GRAD=True, AMSGRAD=True),
}


def _sass(cubin: bytes) -> str:
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([nvdisasm, "-c", f.name], check=True, capture_output=True, text=True).stdout
    # instructions only: no comments (line tables) and no addresses
    lines = [re.sub(r"/\*[0-9a-f]{4,}\*/", "", line.split("//")[0]).strip() for line in text.splitlines()]
    return "\n".join(line for line in lines if line)


def compile_config(pdtype: str, moments: str, flags: dict) -> str:
    kernel = mta._multi_tensor_adam_kernel
    names = kernel.arg_names
    ptype, psize = DTYPES[pdtype]
    quant = moments == "int8"
    msize = 1 if quant else DTYPES[moments][1]
    block, iters, num_warps, pvec = mta.kernel_config(psize, msize)
    constexprs = dict(N_LR_ARGS=2, PDTYPE=ptype, MDTYPE=tl.int8 if quant else DTYPES[moments][0], BLOCK=block,
                      CHUNK=block * iters, PVEC=pvec, MVEC=(pvec or 4) if msize < 4 else 0, META_COLS=16,
                      EPS_TORCH=False, DECOUPLED=False, AMSGRAD=False, MAXIMIZE=False, SAVE_SRC=False,
                      SAVE_GRAD=False, EXTRAP=False, PRIOR=False, COMMIT=True, QUANT=quant, HYPER_COLS=10,
                      ALIGNED=True, INTERPRET=False, REPORT=False, STAGES=mta.pipeline_stages(psize, msize))
    constexprs.update(flags)
    if quant and constexprs["AMSGRAD"]:
        return ""
    signature = {n: POINTERS.get(n, "constexpr" if n in constexprs else "fp32") for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in POINTERS}
    src = ASTSource(fn=kernel, signature=signature,
                    constexprs={(names.index(n),): v for n, v in constexprs.items() if n in names}, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=num_warps, enable_fp_fusion=not constexprs["EPS_TORCH"]))
    return hashlib.sha256(_sass(compiled.asm["cubin"]).encode()).hexdigest()


def main() -> None:
    global mta
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package", default="also_fused", help="the package whose kernels to compile")
    mta = importlib.import_module(f"{parser.parse_args().package}.kernels.multi_tensor_adam")
    out = {}
    for pdtype in DTYPES:
        for moments in ("fp32", "bf16", "int8"):
            for name, flags in PASSES.items():
                digest = compile_config(pdtype, moments, flags)
                if digest:
                    out[f"{pdtype}-{moments}-{name}"] = digest
                    print(f"{pdtype}-{moments}-{name}: {digest[:16]}", file=sys.stderr, flush=True)
    json.dump(out, sys.stdout, indent=1, sort_keys=True)
    print()


if __name__ == "__main__":
    main()
