"""Without a GPU, the interpreter never compiles the kernels: compile them for an H100/H200 (sm_90) here.

Catches what only the compiler rejects (types, shapes, unsupported constructs) in sessions without a
GPU, and checks that the decode-attention kernels' default path compiles to the instructions it did
before they learned sinks, softcapping and value widths. The test process runs kernels under
TRITON_INTERPRET=1, so the compiling happens in a child process without it (this file run as a
script). Skipped where a GPU runs the kernels for real, or where Triton's NVIDIA toolchain is missing.
"""

import collections
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

NO_TOOLCHAIN = 3  # the child's exit status when triton cannot target NVIDIA GPUs here


# About ten seconds of ptxas on two cores: part of the full suite, not of the quick loop.
@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile and run the kernels")
def test_every_kernel_compiles_for_sm90():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # The child imports the frozen copy of the attention ops from the shared test helpers.
    tests = str(pathlib.Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [tests, env.get("PYTHONPATH")]))
    child = subprocess.run(
        [sys.executable, str(pathlib.Path(__file__))], env=env, capture_output=True, text=True, timeout=300
    )
    if child.returncode == NO_TOOLCHAIN:
        pytest.skip(child.stdout.strip())
    assert child.returncode == 0, child.stdout + child.stderr


def compile_for_sm90(kernel, pointer_types: dict, constexprs: dict):
    """Compile one specialisation of `kernel` down to an sm_90 cubin; returns the compiled kernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = kernel.arg_names

    def scalar(name):
        return "fp32" if name == "scaling" else "i32"

    signature = {n: "constexpr" if n in constexprs else pointer_types.get(n, scalar(n)) for n in names}
    source = ASTSource(fn=kernel, signature=signature, constexprs={(names.index(k),): v for k, v in constexprs.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
    assert compiled.asm["cubin"], f"{kernel.__name__}: no cubin"
    return compiled


def label_append_compiles(bits, key_type, code_type):
    from doublesparse.kernels import label_append

    pointers = {
        "keys_ptr": key_type,
        "channels_ptr": "*i64",
        "codes_ptr": code_type,
        "scale_ptr": "*fp16",
        "offset_ptr": "*fp16",
    }
    compile_for_sm90(
        label_append._label_append_kernel,
        pointers,
        dict(NUM_CHANNELS=16, BITS=bits, BLOCK_T=64, BLOCK_C=8 if bits == 4 else 16),
    )


def label_scores_compile(bits, layout):
    from doublesparse.kernels import label_scores

    per_label, labels_per_program, selects_per_label, heads_per_select = layout
    code_type = "*bf16" if bits == 16 else "*u8"
    pointers = {
        "q_ptr": "*bf16",
        "codes_ptr": code_type,
        "scale_ptr": "*fp16",
        "offset_ptr": "*fp16",
        "out_ptr": "*fp32",
    }
    width = 8 if bits == 4 else 16
    constexprs = dict(
        CODE_WIDTH=width,
        BITS=bits,
        QUERY_PER_LABEL=per_label,
        LABELS_PER_PROGRAM=labels_per_program,
        SELECTS_PER_LABEL=selects_per_label,
        HEADS_PER_SELECT_IN_LABEL=heads_per_select,
        BLOCK_L=1,
        BLOCK_T=256,
        BLOCK_C=width,
    )
    compile_for_sm90(label_scores._label_scores_kernel, pointers, constexprs)


def decode_attention_compiles(dtype, dense, single_split, key_dim, value_dim, has_sinks, softcap):
    import triton

    from doublesparse.kernels import flash_decode

    block_dk, block_dv = (max(16, triton.next_power_of_2(width)) for width in (key_dim, value_dim))
    pointers = {
        "q_ptr": f"*{dtype}",
        "k_ptr": f"*{dtype}",
        "v_ptr": f"*{dtype}",
        "index_ptr": "*i64",
        "keep_ptr": "*u8",
        "sinks_ptr": "*fp32",
        "part_out_ptr": "*fp32",
        "part_max_ptr": "*fp32",
        "part_sum_ptr": "*fp32",
        "out_ptr": f"*{dtype}",
    }
    constexprs = dict(
        HEADS_PER_PROGRAM=4,
        QUERY_PER_KV=4,
        KEY_DIM=key_dim,
        VALUE_DIM=value_dim,
        DENSE=dense,
        HAS_KEEP=True,
        SINGLE_SPLIT=single_split,
        HAS_SINKS=has_sinks,
        SOFTCAP=softcap,
        BLOCK_H=16,
        BLOCK_K=64,
        BLOCK_DK=block_dk,
        BLOCK_DV=block_dv,
    )
    compile_for_sm90(flash_decode._decode_partial_kernel, pointers, constexprs)
    if not single_split:
        merge_pointers = {
            "part_out_ptr": "*fp32",
            "part_max_ptr": "*fp32",
            "part_sum_ptr": "*fp32",
            "sinks_ptr": "*fp32",
            "out_ptr": f"*{dtype}",
        }
        merge_constexprs = dict(VALUE_DIM=value_dim, HAS_SINKS=has_sinks, BLOCK_S=32, BLOCK_DV=block_dv)
        compile_for_sm90(flash_decode._decode_merge_kernel, merge_pointers, merge_constexprs)


def ptx_instructions(compiled) -> collections.Counter:
    """The PTX instructions of a compiled kernel with register names and parameter loads left out."""
    body = compiled.asm["ptx"].split("{", 1)[1]
    lines = (line.strip() for line in body.splitlines())
    skipped = ("//", ".", "$", "{", "}", "ld.param")  # comments, directives, labels, braces, parameter loads
    kept = (line for line in lines if line and not line.startswith(skipped) and not line.endswith(":"))
    return collections.Counter(re.sub(r"%[a-z]+\d+", "%", line) for line in kept)


def default_decode_attention_compiles_as_before(dtype, dense, single_split, head_dim):
    """Without sinks or softcapping and with one head size, the kernels compile to the instructions they
    did before they learned those (tests/frozen_attention.py): only the parameter list differs."""
    import frozen_attention
    import triton

    from doublesparse.kernels import flash_decode

    block_d = max(16, triton.next_power_of_2(head_dim))
    pointers = {
        "q_ptr": f"*{dtype}",
        "k_ptr": f"*{dtype}",
        "v_ptr": f"*{dtype}",
        "index_ptr": "*i64",
        "keep_ptr": "*u8",
        "sinks_ptr": "*fp32",
        "part_out_ptr": "*fp32",
        "part_max_ptr": "*fp32",
        "part_sum_ptr": "*fp32",
        "out_ptr": f"*{dtype}",
    }
    shared = dict(
        HEADS_PER_PROGRAM=4,
        QUERY_PER_KV=4,
        DENSE=dense,
        HAS_KEEP=True,
        SINGLE_SPLIT=single_split,
        BLOCK_H=16,
        BLOCK_K=64,
    )
    then = compile_for_sm90(
        frozen_attention._decode_partial_kernel, pointers, dict(shared, HEAD_DIM=head_dim, BLOCK_D=block_d)
    )
    now = compile_for_sm90(
        flash_decode._decode_partial_kernel,
        pointers,
        dict(
            shared,
            KEY_DIM=head_dim,
            VALUE_DIM=head_dim,
            HAS_SINKS=False,
            SOFTCAP=0.0,
            BLOCK_DK=block_d,
            BLOCK_DV=block_d,
        ),
    )
    assert ptx_instructions(now) == ptx_instructions(then), f"partial kernel {dtype} {dense} {single_split} {head_dim}"
    then = compile_for_sm90(
        frozen_attention._decode_merge_kernel, pointers, dict(HEAD_DIM=head_dim, BLOCK_S=32, BLOCK_D=block_d)
    )
    now = compile_for_sm90(
        flash_decode._decode_merge_kernel,
        pointers,
        dict(VALUE_DIM=head_dim, HAS_SINKS=False, BLOCK_S=32, BLOCK_DV=block_d),
    )
    assert ptx_instructions(now) == ptx_instructions(then), f"merge kernel {dtype} {head_dim}"


def main() -> int:
    """Compile every kernel variant; exit status NO_TOOLCHAIN where triton cannot target NVIDIA GPUs."""
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError as error:
        print(f"triton has no NVIDIA backend here: {error}")
        return NO_TOOLCHAIN
    for case in [(16, "*bf16", "*bf16"), (4, "*fp16", "*u8")]:
        label_append_compiles(*case)
    for case in [(16, (4, 1, 1, 4)), (4, (1, 4, 1, 1))]:
        label_scores_compile(*case)
    # The default path, then sinks and softcapping with values narrower than keys (MLA), both split modes.
    for case in [
        ("fp16", False, False, 128, 128, False, 0.0),
        ("bf16", True, True, 80, 80, False, 0.0),
        ("bf16", False, False, 192, 128, True, 50.0),
        ("fp16", True, True, 48, 32, True, 30.0),
    ]:
        decode_attention_compiles(*case)
    for case in [("fp16", False, False, 128), ("bf16", True, True, 80)]:
        default_decode_attention_compiles_as_before(*case)
    print("all kernels compile for sm_90")
    return 0


if __name__ == "__main__":
    sys.exit(main())
