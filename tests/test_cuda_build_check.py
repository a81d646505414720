"""scripts/cuda_build_check.py / .sh (the CI stage that builds, links and loads the CUDA extension against a CUDA
torch without a GPU): each of its checks fails on what it guards against and passes on the real thing.

The full check needs the CUDA torch venv (5.5 GB): CI runs it as its own stage. Here, on the CPU build the
tests run with: the dispatcher check finds exactly the CUDA kernels a CPU-only build lacks, the fake-tensor
(CUDA fake tensors work without CUDA) and meta passes and the CPU numerics are clean, and the SASS reader
passes the step's real vector kernel and fails a scalar impostor (when nvcc and cuobjdump are here).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import ddim_fast  # noqa: F401  (registers the ops)

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "cuda_build_check.py"
SHELL = REPO / "scripts" / "cuda_build_check.sh"


def _module():
    if "cuda_build_check_under_test" not in sys.modules:
        spec = importlib.util.spec_from_file_location("cuda_build_check_under_test", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules["cuda_build_check_under_test"]


def test_dispatcher_check_finds_what_a_cpu_only_build_lacks():
    import torch

    check = _module()
    problems = check.check_dispatcher()
    if torch.version.cuda is None:
        missing = sorted(p.split(": ")[0] for p in problems)
        assert missing == ["ddim_fast::ddim_step", "ddim_fast::ddim_step_out", "ddim_fast::scaled_masked_softmax",
                           "ddim_fast::scaled_masked_softmax_"], problems
        assert all("no CUDA kernel (expected one from cuda)" in p for p in problems), problems
    else:  # a CUDA build of torch and of the extension: nothing missing
        assert problems == [], problems


def test_dispatcher_check_fails_a_kernel_registered_from_the_wrong_place():
    check = _module()
    wrong = {op: dict(keys) for op, keys in check.EXPECTED.items()}
    wrong["attention"]["CUDA"] = "cuda"  # claim a C++ CUDA attention kernel: it is the Python-registered Triton one
    wrong["attention_triton"]["CPU"] = "cpu"
    problems = [p for p in check.check_dispatcher(wrong) if "attention" in p]
    assert len(problems) == 2, problems
    assert all("registered at" in p and p.endswith(("expected cuda", "expected cpu")) for p in problems), problems
    fewer = {op: keys for op, keys in check.EXPECTED.items() if op != "ddim_step_triton"}
    assert any("ddim_fast::ddim_step_triton is registered but this check has no expectation" in p
               for p in check.check_dispatcher(fewer))


def test_classify_registration_sites():
    check = _module()
    assert check.classify("/tmp/x/csrc/cuda/ddim_step_cuda.cpp") == "cuda"
    assert check.classify("/work/csrc/cpu/attention_cpu.cpp") == "cpu"
    assert check.classify("/usr/lib/python3.11/site-packages/torch/library.py") == "python"
    assert check.classify("/work/csrc/ddim_step_args.cpp") == "shared"  # device-agnostic kernels of csrc/ itself
    assert check.classify("/work/other/ops.cpp") == "/work/other/ops.cpp"  # none of these: reported as is


@pytest.mark.parametrize("kind", ["cuda", "meta"])
def test_fake_and_meta_passes_are_clean(kind):
    assert _module().check_fake_pass(kind) == []


def test_fake_pass_reports_a_wrong_output():
    check = _module()
    original = check.op_calls

    def wrong_shapes(torch, device):
        return [(op, args, None if outputs is None else [((1,), dtype) for _shape, dtype in outputs])
                for op, args, outputs in original(torch, device)]

    check.op_calls = wrong_shapes
    try:
        problems = check.check_fake_pass("meta")
    finally:
        check.op_calls = original
    assert problems and all("expected ((1,)" in p for p in problems), problems


def test_cpu_numerics_match_the_reference():
    assert _module().check_cpu_numerics() == []


SASS_SAMPLE = """
	code for sm_90
		Function : _ZN9ddim_fast23ddim_step_vector_kernelIfEEvNS_14DdimStepParamsE
        /*0060*/                   LDG.E.64 R2, desc[UR12][R2.64] ;
        /*0070*/                   LDG.E.128 R4, desc[UR12][R6.64] ;
        /*0080*/                   STG.E.128 desc[UR12][R8.64], R4 ;
		Function : _ZN9ddim_fast23ddim_step_scalar_kernelI6__halfLb0EEEvNS_14DdimStepParamsE
        /*0060*/                   LDG.E.U16 R2, desc[UR12][R2.64] ;
        /*0070*/              @!P0 LDG.E.CONSTANT R3, desc[UR12][R4.64] ;
        /*0080*/                   STG.E.U16 desc[UR12][R8.64], R4 ;
"""

PTXAS_SAMPLE = """
ptxas info    : Compiling entry function '_ZN9ddim_fast23ddim_step_vector_kernelIfEEvNS_14DdimStepParamsE' for 'sm_90'
ptxas info    : Function properties for _ZN9ddim_fast23ddim_step_vector_kernelIfEEvNS_14DdimStepParamsE
    48 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 0 barriers, 48 bytes cumulative stack size
"""


def test_sass_and_ptxas_readers():
    check = _module()
    functions = check.sass_functions(SASS_SAMPLE)
    assert len(functions) == 2
    vector = next(body for name, body in functions.items() if "vector" in name)
    scalar = next(body for name, body in functions.items() if "scalar" in name)
    assert check.sass_access_bits(vector) == (128, 128)
    assert check.sass_access_bits(scalar) == (32, 16)
    stats = check.ptxas_stats(PTXAS_SAMPLE)
    assert stats == {("_ZN9ddim_fast23ddim_step_vector_kernelIfEEvNS_14DdimStepParamsE", 90):
                     dict(regs=40, stack=48, spill_stores=0, spill_loads=0)}


def _toolchain():
    nvcc = shutil.which("nvcc")
    cuobjdump = _module().find_cuobjdump(None)
    if nvcc is None or cuobjdump is None:
        pytest.skip("needs nvcc and cuobjdump (the toolkit's, or the triton wheel's)")
    return nvcc, cuobjdump


IMPOSTOR = r"""
// A "vector kernel" that moves 2 bytes per access: the SASS check must refuse it.
#include <cuda_fp16.h>
__global__ void ddim_step_vector_kernel(const __half* x, __half* out, long n) {
  long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
  if (i < n) out[i] = __hadd(x[i], x[i]);
}
"""


def test_sass_report_passes_the_step_kernel_and_fails_a_scalar_impostor(tmp_path):
    nvcc, cuobjdump = _toolchain()
    check = _module()
    good = tmp_path / "step.o"
    subprocess.run([nvcc, "-c", "-O3", "-std=c++17", f"-I{REPO / 'csrc'}", f"-I{REPO / 'csrc' / 'include'}",
                    "--expt-relaxed-constexpr", "-gencode=arch=compute_90,code=sm_90", "-o", str(good),
                    str(REPO / "csrc" / "cuda" / "ddim_step_kernel.cu")], check=True, capture_output=True)
    rows, problems = check.sass_report(str(good), [90], cuobjdump)
    assert problems == [], problems
    vector_rows = [r for r in rows if r["vector_path"]]
    assert all(r["max_global_load_bits"] == 128 and r["max_global_store_bits"] == 128 for r in vector_rows), vector_rows
    general = [r for r in vector_rows if "ddim_step_vector_kernel" in r["kernel"]]
    lean = [r for r in vector_rows if check.LEAN_KERNEL in r["kernel"]]
    # 3 dtypes; the lean kernels: 3 dtypes x 3 prediction types x guided or not x noise tensor or not.
    assert len(general) == 3 and len(lean) == 36, [r["kernel"] for r in vector_rows]
    assert max(r["sass_instructions"] for r in lean) <= check.LEAN_MAX_INSTRUCTIONS
    assert min(r["sass_instructions"] for r in general) > 4 * max(r["sass_instructions"] for r in lean)
    # The size rule can fail: with a budget the lean kernels exceed, each of them is reported.
    budget = check.LEAN_MAX_INSTRUCTIONS
    try:
        check.LEAN_MAX_INSTRUCTIONS = 10
        _rows, problems = check.sass_report(str(good), [90], cuobjdump)
    finally:
        check.LEAN_MAX_INSTRUCTIONS = budget
    assert len(problems) == 36 and all("the lean step kernel must stay small" in p for p in problems), problems
    src = tmp_path / "impostor.cu"
    src.write_text(textwrap.dedent(IMPOSTOR))
    bad = tmp_path / "impostor.o"
    subprocess.run([nvcc, "-c", "-O3", "-gencode=arch=compute_90,code=sm_90", "-o", str(bad), str(src)], check=True,
                   capture_output=True)
    _rows, problems = check.sass_report(str(bad), [90], cuobjdump, vector_kernels=("ddim_step_vector_kernel",))
    assert len(problems) == 1 and "widest global load/store 16/16 bits, expected 128" in problems[0], problems
    _rows, problems = check.sass_report(str(bad), [90], cuobjdump, vector_kernels=("no_such_kernel",))
    assert problems == ["sm_90: no no_such_kernel in the SASS of " + str(bad)], problems


def test_main_refuses_a_cpu_torch():
    import torch

    if torch.version.cuda is not None:
        pytest.skip("this torch has CUDA")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--source-root", str(REPO)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "has no CUDA: this check needs a CUDA build of torch" in proc.stdout, proc.stdout[-3000:]


def test_shell_script_skips_without_a_toolkit(tmp_path):
    # No nvcc on PATH and no CUDA_HOME: nothing to build with, so it says so and succeeds; on purpose, too.
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "NVCC")}
    env["PATH"] = "/usr/bin:/bin"
    proc = subprocess.run(["bash", str(SHELL)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "skipped: no nvcc on PATH" in proc.stdout, proc.stdout + proc.stderr
    env["DDIM_FAST_SKIP_CUDA_BUILD_CHECK"] = "1"
    proc = subprocess.run(["bash", str(SHELL)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "skipped: DDIM_FAST_SKIP_CUDA_BUILD_CHECK=1" in proc.stdout, proc.stdout


# The C++ standard: whatever torch's cpp_extension of the installed version chooses, not a fixed rule (torch 2.11,
# the first GPU image's, passes -std=c++17 itself; 2.13+ pass -std=c++20).
CPP_EXTENSION_2_11 = """
        def append_std17_if_no_std_present(cflags) -> None:
            cpp_format_prefix = '/{}:' if self.compiler.compiler_type == 'msvc' else '-{}='
            cpp_flag_prefix = cpp_format_prefix.format('std')
            cpp_flag = cpp_flag_prefix + 'c++17'
            if not any(flag.startswith(cpp_flag_prefix) for flag in cflags):
                cflags.append(cpp_flag)
"""
LOG_2_11 = ("[1/2] /opt/gcc/bin/g++ -c ops.cpp -o ops.o -O3 -fopenmp -DTORCH_EXTENSION_NAME=_C -std=c++17\n"
            "[2/2] /usr/local/cuda/bin/nvcc -c k.cu -o k.o -ccbin /opt/gcc/bin/gcc -std=c++17\n")


def test_std_check_follows_the_torch_version():
    check = _module()
    assert check.torch_cpp_standards(CPP_EXTENSION_2_11) == {"c++17"}
    assert check.torch_cpp_standards(CPP_EXTENSION_2_11.replace("c++17", "c++20")) == {"c++20"}
    assert check.check_std_flags(LOG_2_11, {"c++17"}, "torch 2.11.0") == []  # the GPU image's build: fine
    problems = check.check_std_flags(LOG_2_11, {"c++20"}, "torch 2.14.1")
    assert problems == ["the build passed -std=c++17, but torch 2.14.1's cpp_extension chooses -std=c++20: let torch "
                        "choose (setup.py passes no -std)"], problems
    assert check.check_std_flags(LOG_2_11, set())[0].startswith("could not tell which C++ standard")


def test_std_check_reads_the_installed_torch(tmp_path):
    # This Python's torch (2.13+: C++20), through the CLI the shell script calls; no torch import needed.
    check = _module()
    source = check.cpp_extension_source()
    assert source is not None and source.name == "cpp_extension.py"
    standards = check.torch_cpp_standards(source.read_text())
    assert len(standards) == 1, standards
    (std,) = standards
    good, bad = tmp_path / "good.log", tmp_path / "bad.log"
    good.write_text(LOG_2_11.replace("c++17", std))
    bad.write_text(LOG_2_11.replace("c++17", "c++14"))
    ok = subprocess.run([sys.executable, str(SCRIPT), "--check-std", str(good)], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and f"-std={std}, as torch" in ok.stdout, ok.stdout + ok.stderr
    fail = subprocess.run([sys.executable, str(SCRIPT), "--check-std", str(bad)], capture_output=True, text=True, timeout=60)
    assert fail.returncode == 1 and "the build passed -std=c++14" in fail.stdout, fail.stdout + fail.stderr
