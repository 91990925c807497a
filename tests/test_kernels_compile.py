"""Without a GPU, the interpreter never compiles the kernels: compile them for an H100/H200 (sm_90) here.

Catches what only the compiler rejects (types, shapes, unsupported constructs) in sessions without a
GPU. The test process runs kernels under TRITON_INTERPRET=1, so the compiling happens in a child
process without it (this file run as a script). Skipped where a GPU runs the kernels for real, or
where Triton's NVIDIA toolchain is missing.
"""

import os
import pathlib
import subprocess
import sys

import pytest
import torch

NO_TOOLCHAIN = 3  # the child's exit status when triton cannot target NVIDIA GPUs here


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile and run the kernels")
def test_every_kernel_compiles_for_sm90():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    child = subprocess.run([sys.executable, str(pathlib.Path(__file__))], env=env, capture_output=True, text=True, timeout=300)
    if child.returncode == NO_TOOLCHAIN:
        pytest.skip(child.stdout.strip())
    assert child.returncode == 0, child.stdout + child.stderr


def compile_for_sm90(kernel, pointer_types: dict, constexprs: dict) -> None:
    """Compile one specialisation of `kernel` down to an sm_90 cubin."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = kernel.arg_names
    scalar = lambda name: "fp32" if name == "scaling" else "i32"
    signature = {n: "constexpr" if n in constexprs else pointer_types.get(n, scalar(n)) for n in names}
    source = ASTSource(fn=kernel, signature=signature, constexprs={(names.index(k),): v for k, v in constexprs.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
    assert compiled.asm["cubin"], f"{kernel.__name__}: no cubin"


def label_append_compiles(bits, key_type, code_type):
    from doublesparse.kernels import label_append

    pointers = {"keys_ptr": key_type, "channels_ptr": "*i64", "codes_ptr": code_type, "scale_ptr": "*fp16", "offset_ptr": "*fp16"}
    compile_for_sm90(label_append._label_append_kernel, pointers, dict(NUM_CHANNELS=16, BITS=bits, BLOCK_T=64, BLOCK_C=8 if bits == 4 else 16))


def label_scores_compile(bits, layout):
    from doublesparse.kernels import label_scores

    per_label, labels_per_program, selects_per_label, heads_per_select = layout
    code_type = "*bf16" if bits == 16 else "*u8"
    pointers = {"q_ptr": "*bf16", "codes_ptr": code_type, "scale_ptr": "*fp16", "offset_ptr": "*fp16", "out_ptr": "*fp32"}
    width = 8 if bits == 4 else 16
    constexprs = dict(CODE_WIDTH=width, BITS=bits, QUERY_PER_LABEL=per_label, LABELS_PER_PROGRAM=labels_per_program,
                      SELECTS_PER_LABEL=selects_per_label, HEADS_PER_SELECT_IN_LABEL=heads_per_select, BLOCK_L=1, BLOCK_T=256, BLOCK_C=width)
    compile_for_sm90(label_scores._label_scores_kernel, pointers, constexprs)


def decode_attention_compiles(dtype, dense, single_split, head_dim):
    import triton

    from doublesparse.kernels import sparse_attention

    block_d = triton.next_power_of_2(head_dim)
    pointers = {"q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "v_ptr": f"*{dtype}", "index_ptr": "*i64", "keep_ptr": "*u8",
                "part_out_ptr": "*fp32", "part_max_ptr": "*fp32", "part_sum_ptr": "*fp32", "out_ptr": f"*{dtype}"}
    constexprs = dict(HEADS_PER_PROGRAM=4, QUERY_PER_KV=4, HEAD_DIM=head_dim, DENSE=dense, HAS_KEEP=True,
                      SINGLE_SPLIT=single_split, BLOCK_H=16, BLOCK_K=64, BLOCK_D=block_d)
    compile_for_sm90(sparse_attention._decode_partial_kernel, pointers, constexprs)
    if not single_split:
        merge_pointers = {"part_out_ptr": "*fp32", "part_max_ptr": "*fp32", "part_sum_ptr": "*fp32", "out_ptr": f"*{dtype}"}
        compile_for_sm90(sparse_attention._decode_merge_kernel, merge_pointers, dict(HEAD_DIM=head_dim, BLOCK_S=32, BLOCK_D=block_d))


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
    for case in [("fp16", False, False, 128), ("bf16", True, True, 80)]:
        decode_attention_compiles(*case)
    print("all kernels compile for sm_90")
    return 0


if __name__ == "__main__":
    sys.exit(main())
