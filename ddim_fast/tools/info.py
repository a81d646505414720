"""``python -m ddim_fast info``: which ddim_fast backends are built and usable here, and the versions and
hardware they run on. Also the hardware/version description the bench and profile JSON files carry."""

from __future__ import annotations

import importlib
import os
import platform
from typing import Any

import torch


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux, else platform.processor())."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def hardware_name(device: torch.device | str | None = None) -> str:
    """'NVIDIA H100 80GB HBM3' for a CUDA device, '<CPU model> (N cores)' for the CPU."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({os.cpu_count()} cores)"


def _version(module_name: str) -> str | None:
    try:
        module = importlib.import_module(module_name)
    except Exception:  # missing or broken optional dependency: report it as absent
        return None
    return getattr(module, "__version__", "unknown")


def _backend_status() -> dict[str, str]:
    """Each backend -> a one-line status ('usable: ...' or 'not usable: why')."""
    status: dict[str, str] = {}
    try:
        from ddim_fast import ops
    except ImportError as exc:
        reason = f"not usable: {str(exc).splitlines()[0]}"
        return {"C++ CPU": reason, "CUDA extension": reason, "Triton": reason}

    status["C++ CPU"] = ("usable: torch.ops.ddim_fast.ddim_step has a CPU kernel" if ops.has_native_kernel("cpu")
                         else "not usable: the extension registered no CPU kernel")
    if ops.has_native_kernel("cuda"):
        status["CUDA extension"] = ("usable: CUDA kernels built" if torch.cuda.is_available()
                                    else "built, but no CUDA device is visible")
    elif torch.version.cuda is None:
        status["CUDA extension"] = f"not built: torch {torch.__version__} has no CUDA (see setup.py)"
    else:
        status["CUDA extension"] = "not built: rebuild with nvcc available (see setup.py)"

    if _version("triton") is None:
        status["Triton"] = "not usable: triton is not installed"
    elif torch.cuda.is_available():
        status["Triton"] = ("usable: compiled kernels on the GPU" if ops.triton_available()
                            else "not usable: ddim_fast.triton failed to import")
    elif os.environ.get("TRITON_INTERPRET") == "1":
        status["Triton"] = ("usable: interpreter on CPU tensors (TRITON_INTERPRET=1; slow, for testing)"
                            if ops.triton_available() else "not usable: ddim_fast.triton failed to import")
    else:
        status["Triton"] = "not usable here: no GPU (set TRITON_INTERPRET=1 to run the kernels in the interpreter)"
    status["reference"] = "usable: pure PyTorch (ddim_fast/reference.py)"
    return status


def _extension_build() -> dict[str, Any] | None:
    """Who compiled the loaded ddim_fast._C: the record scripts/native_toolchain.py leaves in the checkout's
    build/toolchain.json (compiler, why, the post-build self-check) when it describes this very library, else the
    compilers named in the library's .comment section."""
    try:
        from ddim_fast import _C
    except ImportError:
        return None
    path = _C.__file__
    try:
        data = open(path, "rb").read()
    except OSError:
        return None
    record_path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(path))), "build", "toolchain.json")
    try:
        import hashlib
        import json

        with open(record_path, encoding="utf-8") as f:
            record = json.load(f)
        if record.get("extension_sha256") == hashlib.sha256(data).hexdigest() and record.get("compiler"):
            c = record["compiler"]
            name = {"gcc": "GCC", "clang": "clang"}.get(c.get("kind"), c.get("kind", ""))
            check = record.get("selfcheck") or {}
            return {"compiler": f"{c.get('path')} ({name} {c.get('version')})", "why": record.get("why"),
                    "selfcheck": ("passed: " if check.get("ok") else "FAILED: ") + str(check.get("summary", "")),
                    "record": record_path}
    except (OSError, ValueError, AttributeError):
        pass
    import re

    compilers = re.findall(rb"(?:GCC: \([^)]*\) [0-9.]+|clang version [0-9.]+)", data)  # the .comment section
    named = sorted({m.decode(errors="replace") for m in compilers})
    return {"compiler": "; ".join(named) or "unknown", "why": None, "selfcheck": "not recorded (build with "
            "scripts/setup_env.sh)", "record": None}


def collect() -> dict[str, Any]:
    """Everything ``info`` prints, as a JSON-able dict."""
    gpu = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        gpu = {"name": props.name, "capability": f"{props.major}.{props.minor}",
               "memory_gib": round(props.total_memory / 2**30, 1), "count": torch.cuda.device_count()}
    return {
        "backends": _backend_status(),
        "extension_build": _extension_build(),
        "gpu": gpu,
        "cpu": {"model": cpu_model(), "cores": os.cpu_count()},
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda (torch)": torch.version.cuda or "none (CPU build of torch)",
            "triton": _version("triton"),
            "diffusers": _version("diffusers"),
            "ddim_fast": _version("ddim_fast"),
        },
        "platform": platform.platform(),
    }


def environment_summary(device: torch.device | str | None = None) -> dict[str, Any]:
    """The short description stored in bench/profile JSON: hardware, versions."""
    return {
        "hardware": hardware_name(device),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "diffusers": _version("diffusers"),
    }


def format_info(data: dict[str, Any]) -> str:
    lines = ["ddim_fast backends:"]
    width = max(len(k) for k in data["backends"])
    for name, state in data["backends"].items():
        lines.append(f"  {name:<{width}}  {state}")
    build = data.get("extension_build")
    if build:
        lines.append(f"  {'built by':<{width}}  {build['compiler']}; self-check {build['selfcheck']}")
    lines.append("hardware:")
    if data["gpu"]:
        g = data["gpu"]
        sm = g["capability"].replace(".", "")
        lines.append(f"  GPU   {g['name']} (sm_{sm}, {g['memory_gib']} GiB) x{g['count']}")
    else:
        lines.append("  GPU   none visible to torch")
    lines.append(f"  CPU   {data['cpu']['model']}, {data['cpu']['cores']} cores")
    lines.append("versions:")
    for name, version in data["versions"].items():
        lines.append(f"  {name:<12} {version if version is not None else 'not installed'}")
    lines.append(f"platform: {data['platform']}")
    return "\n".join(lines)


def main(args) -> int:
    data = collect()
    if getattr(args, "json", None):
        import json

        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
    print(format_info(data))
    return 0


def add_arguments(parser) -> None:
    from ddim_fast.tools import arguments

    parser.add_argument("--json", metavar="FILE", type=arguments.output_file,
                        help="also write the information as JSON (default: none)")
