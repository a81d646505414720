"""The one backend resolver (ddim_fast.backends) and attention's measured choice (ddim_fast.attention_choice,
ddim_fast.attention): the resolution table per op, device, dtype and what is built (monkeypatched, no GPU
needed); the choice among candidates with fake timings (fastest correct wins, a wrong or raising candidate
never does, near-ties go to the static default); the cache (memory hit, disk round trip, version
invalidation); no measurement while a CUDA graph is captured or torch.compile traces; the processors and the
ldm patch calling the chosen backend."""

from __future__ import annotations

import json

import pytest
import torch

import ddim_fast
import oracles
from conftest import TOLERANCES, assert_rel_close
from ddim_fast import _library, attention_choice, backends, ops
from ddim_fast import attention as fa
from ddim_fast.backends import MEASURED

CPU, CUDA, META, MPS = (torch.device(d) for d in ("cpu", "cuda", "meta", "mps"))


@pytest.fixture
def built(monkeypatch):
    """Sets what is "built and installed": built(native={(device, op), ...}, triton=bool)."""

    def set_built(native=(), triton=True):
        monkeypatch.setattr(_library, "NATIVE_KERNELS", frozenset(native))
        monkeypatch.setattr(_library, "TRITON_FOUND", triton)
        backends.clear_cache()

    yield set_built
    backends.clear_cache()


@pytest.fixture
def fresh_choices(monkeypatch, tmp_path):
    """Empty choice caches, the cache file under tmp_path, and the injection points restored after."""
    monkeypatch.setenv("DDIM_FAST_CACHE_DIR", str(tmp_path))
    fa.clear_attention_choices()
    yield tmp_path
    fa.clear_attention_choices()


STEP_OPS = {("cpu", "ddim_step"), ("cuda", "ddim_step")}
ALL_CPU = {("cpu", op) for op in ("ddim_step", "attention", "scaled_masked_softmax")}


# --------------------------------------------------------------------------------------------------
# The resolution table
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("native, triton, device, dtype, expected", [
    (ALL_CPU, True, CPU, torch.float32, "native"),
    (ALL_CPU, True, CPU, torch.bfloat16, "native"),
    (ALL_CPU, True, CPU, torch.float64, "reference"),  # the kernels store fp32/fp16/bf16
    (ALL_CPU, True, META, torch.float16, "native"),  # the fake kernel
    (STEP_OPS, True, CUDA, torch.float16, "native"),  # the CUDA op before Triton (host cost)
    (ALL_CPU, True, CUDA, torch.float16, "triton"),  # no CUDA build
    (ALL_CPU, False, CUDA, torch.float16, "reference"),
    (STEP_OPS, True, CUDA, torch.float64, "reference"),
    (ALL_CPU, True, MPS, torch.float32, "reference"),
    ((), False, CPU, torch.float32, "reference"),
])
def test_step_auto(built, native, triton, device, dtype, expected):
    built(native, triton)
    assert backends.resolve("ddim_step", "auto", device, dtype) == expected
    assert ops.resolve_backend("auto", device, dtype) == expected
    assert ops.resolve_backend is backends.resolve_step_backend


def test_step_explicit_errors(built):
    built(ALL_CPU, triton=False)
    with pytest.raises(RuntimeError, match="backend='native': the ddim_fast C\\+\\+ extension has no cuda kernel"):
        ops.resolve_backend("native", CUDA)
    with pytest.raises(RuntimeError, match="backend='triton': the triton package is not installed"):
        ops.resolve_backend("triton", CUDA)
    with pytest.raises(TypeError, match="backend='native' supports float32/float16/bfloat16, got torch.float64"):
        ops.resolve_backend("native", CPU, torch.float64)
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.resolve_backend("cuda", CPU)
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.resolve_backend(["auto"], CPU)  # unhashable: the same message
    assert ops.resolve_backend("native", META) == "native"
    assert ops.resolve_backend("reference", CUDA, torch.float64) == "reference"


@pytest.mark.parametrize("native, triton, device, mask, expected", [
    (ALL_CPU, True, CPU, "none", "sdpa"),  # CPU: SDPA, a static rule (docs/design.md)
    (ALL_CPU, True, CPU, "float", "sdpa"),
    (ALL_CPU, True, CPU, "bool", "native"),  # ldm's masked_fill meaning: our kernel
    ((), True, CPU, "bool", "reference"),
    (ALL_CPU, True, CUDA, "none", MEASURED),
    (ALL_CPU, False, CUDA, "float", MEASURED),  # SDPA backends are still candidates
    (ALL_CPU, True, CUDA, "bool", "triton"),
    (ALL_CPU, False, CUDA, "bool", "reference"),
    (ALL_CPU, True, MPS, "none", "sdpa"),
    (ALL_CPU, True, MPS, "bool", "reference"),
    (ALL_CPU, True, META, "none", "native"),
])
def test_attention_auto(built, native, triton, device, mask, expected):
    built(native, triton)
    assert backends.resolve("attention", "auto", device, torch.float16, mask=mask) == expected


def test_attention_explicit(built):
    built(ALL_CPU, triton=True)
    assert backends.resolve_attention_backend("fused", CPU) == "native"
    assert backends.resolve_attention_backend("fused", CUDA) == "triton"
    assert backends.resolve_attention_backend("sdpa_cudnn", CPU) == "sdpa_cudnn"
    assert backends.resolve_attention_backend("reference", MPS, "bool") == "reference"
    with pytest.raises(RuntimeError, match="backend='native': ddim_fast::attention has no cuda kernel"):
        backends.resolve_attention_backend("native", CUDA)
    built((), triton=False)
    with pytest.raises(RuntimeError, match="backend='fused': ddim_fast has no fused attention kernel for device cpu"):
        backends.resolve_attention_backend("fused", CPU)
    with pytest.raises(RuntimeError, match="backend='fused': .* device cuda"):
        backends.resolve_attention_backend("fused", CUDA)
    with pytest.raises(RuntimeError, match="backend='triton': the triton package is not installed"):
        backends.resolve_attention_backend("triton", CPU)
    with pytest.raises(ValueError, match="backend must be one of"):
        backends.resolve_attention_backend("cudnn", CPU)
    with pytest.raises(ValueError, match="op must be one of"):
        backends.resolve("attn", "auto", CPU)


@pytest.mark.parametrize("native, expected_auto", [(ALL_CPU, "native"), ((), "reference")])
def test_softmax(built, native, expected_auto):
    built(native)
    assert backends.resolve("scaled_masked_softmax", "auto", CPU) == expected_auto
    assert backends.resolve("scaled_masked_softmax", "reference", CPU) == "reference"
    if not native:
        with pytest.raises(RuntimeError, match="scaled_masked_softmax: no cpu kernel"):
            backends.resolve("scaled_masked_softmax", "native", CPU)
    with pytest.raises(ValueError, match="backend must be 'auto', 'native' or 'reference'"):
        backends.resolve("scaled_masked_softmax", "triton", CPU)


@pytest.mark.parametrize("dtype, lk, d, mask, triton, expected", [
    (torch.float16, 77, 40, "none", True, "triton"),  # SD1.5 cross d40: the one H200 win (13.7 vs 14.8 us)
    (torch.float16, 77, 80, "none", True, "sdpa"),  # 0.68x cuDNN
    (torch.float16, 4096, 40, "none", True, "sdpa"),  # self d40: 0.66x
    (torch.float16, 1024, 80, "float", True, "sdpa"),
    (torch.float32, 77, 40, "none", True, "sdpa"),  # never measured: SDPA
    (torch.bfloat16, 77, 40, "none", True, "sdpa"),
    (torch.float16, 77, 40, "none", False, "sdpa"),
    (torch.float16, 4096, 80, "bool", True, "triton"),  # bool masks: ours whatever the shape
])
def test_static_attention_table(built, dtype, lk, d, mask, triton, expected):
    built(ALL_CPU, triton)
    assert backends.static_attention_choice(CUDA, dtype, lk, d, mask) == expected


def test_every_op_has_one_auto_rule():
    assert set(backends.AUTO_RULES) == {"ddim_step", "attention", "scaled_masked_softmax"}
    assert backends.STEP_BACKENDS == ops.BACKENDS
    assert set(backends.SDPA_BACKENDS) <= set(fa.ATTENTION_BACKENDS)


def test_tolerance_table_is_the_tests_table():
    assert attention_choice.TOLERANCES == TOLERANCES
    assert attention_choice.tolerance(torch.float16, 4096) == TOLERANCES[torch.float16]
    assert attention_choice.tolerance(torch.float32, 4096) == 64 * 2.0 ** -24  # sqrt(n) u past the table


# --------------------------------------------------------------------------------------------------
# measure(): the choice among candidates, with fake timings
# --------------------------------------------------------------------------------------------------


class FakeTimer:
    def __init__(self, seconds: dict):
        self.seconds = seconds
        self.calls = {}

    def __call__(self, name, fn, calls):
        fn()  # a timer runs what it times
        self.calls[name] = self.calls.get(name, 0) + 1
        return self.seconds[name]


def _candidates(values: dict):
    """name -> a callable returning a 1-element tensor whose value is the candidate's 'error'."""
    return {name: (lambda v=v: v if isinstance(v, Exception) and _raise(v) else torch.tensor([v]))
            for name, v in values.items()}


def _raise(exc):
    raise exc


def _check(out):
    return float(out[0])


def test_fastest_correct_candidate_wins():
    timer = FakeTimer({"a": 3e-6, "b": 2e-6, "c": 9e-6})
    choice = attention_choice.measure(_candidates({"a": 0.0, "b": 0.0, "c": 0.0}), _check, 1e-3, timer, reps=3)
    assert choice.backend == "b" and choice.source == "measured"
    assert timer.calls == {"a": 3, "b": 3, "c": 1}  # c (> 1.5x the best rough time) is not timed again
    assert choice.seconds == {"a": 3e-6, "b": 2e-6, "c": 9e-6}


def test_wrong_or_raising_candidate_is_never_chosen():
    timer = FakeTimer({"wrong": 1e-9, "nan": 1e-9, "raises": 1e-9, "right": 5e-6})
    candidates = _candidates({"wrong": 0.5, "nan": float("nan"), "raises": RuntimeError("No available kernel"),
                              "right": 1e-4})
    choice = attention_choice.measure(candidates, _check, 2e-3, timer)
    assert choice.backend == "right"
    assert set(timer.calls) == {"right"}  # rejected candidates are not timed
    assert choice.rejected["wrong"] == "wrong: relative error 5.00e-01 > tolerance 2.0e-03"
    assert choice.rejected["nan"].startswith("wrong: relative error nan")
    assert choice.rejected["raises"] == "raised RuntimeError: No available kernel"
    assert set(choice.errors) == {"wrong", "nan", "right"} and choice.errors["nan"] != choice.errors["nan"]
    with pytest.raises(RuntimeError, match="no candidate gave a correct result"):
        attention_choice.measure(_candidates({"wrong": 0.5}), _check, 2e-3, timer)


def test_a_candidate_that_warns_then_raises_is_rejected_silently():
    """A forced SDPA backend that cannot take the inputs warns before it raises (PyTorch's sdp_utils): the
    measurement records the reason and the user sees no warning (optimize stays quiet)."""
    import warnings

    def warns():
        warnings.warn("Flash attention kernel not used because: ...", UserWarning)
        raise RuntimeError("No available kernel")

    candidates = {**_candidates({"right": 0.0}), "flash": warns}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        choice = attention_choice.measure(candidates, _check, 1e-3, FakeTimer({"right": 1e-6}))
    assert choice.backend == "right" and choice.rejected["flash"] == "raised RuntimeError: No available kernel"


def test_cuda_timing_queues_the_calls_behind_a_busy_kernel(monkeypatch):
    """On CUDA the events time the kernels, not the launches (the choices serve graph replays): a busy-wait kernel
    long enough for every call's launch is enqueued before the start event. Checked with a fake CUDA runtime."""
    order = []

    class FakeEvent:
        made = 0

        def __init__(self, enable_timing):
            self.name = ("start", "end")[FakeEvent.made]
            FakeEvent.made += 1

        def record(self):
            order.append(f"record {self.name}")

        def synchronize(self):
            order.append("sync")

        def elapsed_time(self, other):
            return 1.0  # ms

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: order.append(f"sleep {cycles}"))
    seconds = attention_choice.cuda_event_seconds(lambda: order.append("call"), 4, torch.device("cuda"))
    assert order == [f"sleep {4 * attention_choice._QUEUE_CYCLES_PER_CALL}", "record start", "call", "call", "call",
                     "call", "record end", "sync"]
    assert seconds == 1e-3 / 4


def test_preferred_candidate_wins_a_near_tie_only():
    seconds = {"triton": 10.0e-6, "sdpa": 10.2e-6}
    tie = attention_choice.measure(_candidates({"triton": 0.0, "sdpa": 0.0}), _check, 1e-3, FakeTimer(seconds),
                                   preferred="sdpa")
    assert tie.backend == "sdpa"  # within 3%: timing noise must not flip the choice between processes
    seconds["sdpa"] = 11e-6
    clear = attention_choice.measure(_candidates({"triton": 0.0, "sdpa": 0.0}), _check, 1e-3, FakeTimer(seconds),
                                     preferred="sdpa")
    assert clear.backend == "triton"


# --------------------------------------------------------------------------------------------------
# The cache: memory, disk, versions
# --------------------------------------------------------------------------------------------------


def _key(shape=(2, 8, 4096, 40)):
    return attention_choice.ChoiceKey("attention", "cuda:0", "NVIDIA H200", "float16", (shape, shape, shape),
                                      ((1, 2, 3, 4),) * 3, "none")


def test_cache_memory_disk_and_versions(tmp_path):
    stamp = {"torch": "2.11.0"}
    cache = attention_choice.ChoiceCache(tmp_path, stamp=lambda name: dict(stamp))
    assert cache.get(_key()) is None
    measured = attention_choice.Choice("sdpa_cudnn", "measured", {"sdpa_cudnn": 1.5e-4, "triton": 2.4e-4})
    cache.put(_key(), measured)
    assert cache.get(_key()) is measured  # memory hit
    data = json.loads((tmp_path / attention_choice.CACHE_FILE_NAME).read_text())
    assert data["format"] == attention_choice.CACHE_FORMAT
    assert data["devices"]["NVIDIA H200"]["stamp"] == stamp
    # Another process: read from the file.
    other = attention_choice.ChoiceCache(tmp_path, stamp=lambda name: dict(stamp))
    got = other.get(_key())
    assert (got.backend, got.source, got.seconds) == ("sdpa_cudnn", "disk", measured.seconds)
    assert other.get(_key((1, 8, 64, 160))) is None
    # A new torch: that device's entries are stale, and the next write replaces them.
    stamp["torch"] = "2.12.0"
    newer = attention_choice.ChoiceCache(tmp_path, stamp=lambda name: dict(stamp))
    assert newer.get(_key()) is None
    newer.put(_key((1, 8, 64, 160)), attention_choice.Choice("triton", "measured"))
    data = json.loads((tmp_path / attention_choice.CACHE_FILE_NAME).read_text())
    assert list(data["devices"]["NVIDIA H200"]["choices"]) == [_key((1, 8, 64, 160)).disk_key()]
    # Static / rule choices stay in memory.
    newer.put(_key((3, 3, 3, 3)), attention_choice.Choice("sdpa", "static"))
    assert len(json.loads((tmp_path / attention_choice.CACHE_FILE_NAME).read_text())["devices"]["NVIDIA H200"]
               ["choices"]) == 1


def test_cache_survives_bad_files_and_can_be_off(tmp_path, monkeypatch, caplog):
    path = tmp_path / attention_choice.CACHE_FILE_NAME
    path.write_text("{not json")
    cache = attention_choice.ChoiceCache(tmp_path)
    assert cache.get(_key()) is None  # a corrupt file is ignored (one warning), never an error
    cache.put(_key(), attention_choice.Choice("triton", "measured"))
    assert json.loads(path.read_text())["devices"]["NVIDIA H200"]["choices"]
    blocked = tmp_path / "file"
    blocked.write_text("")
    cache = attention_choice.ChoiceCache(blocked / "sub")  # cannot be created: choices stay in memory
    cache.put(_key(), attention_choice.Choice("triton", "measured"))
    assert cache.get(_key()).backend == "triton"
    assert "choices stay in memory" in caplog.text
    monkeypatch.setenv("DDIM_FAST_CACHE_DIR", "")
    assert attention_choice.ChoiceCache().path is None
    monkeypatch.setenv("DDIM_FAST_CACHE_DIR", str(tmp_path / "x"))
    assert attention_choice.ChoiceCache().path == str(tmp_path / "x" / attention_choice.CACHE_FILE_NAME)
    monkeypatch.delenv("DDIM_FAST_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert attention_choice.default_cache_dir() == str(tmp_path / "xdg" / "ddim_fast")


# --------------------------------------------------------------------------------------------------
# fused_attention(backend="auto") end to end, the "CUDA" path driven on CPU tensors
# --------------------------------------------------------------------------------------------------


def _qkv(lq=9, lk=77, d=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 2, lq, d, generator=gen), torch.randn(2, 2, lk, d, generator=gen),
            torch.randn(2, 2, lk, d, generator=gen))


@pytest.fixture
def measured_on_cpu(monkeypatch, fresh_choices):
    """Makes 'auto' measure on CPU tensors, as it does on CUDA: candidates native / sdpa / sdpa_math / a wrong
    one (its output off by 1%), fake timings (the wrong one 'fastest'); records every backend that runs."""
    ran = []
    real_run = fa.run_attention

    def run(backend, q, k, v, scale, mask):
        ran.append(backend)
        if backend == "wrong":
            return real_run("native", q, k, v, scale, mask) * 1.01
        return real_run(backend, q, k, v, scale, mask)

    timer = FakeTimer({"wrong": 1e-6, "native": 3e-6, "sdpa": 5e-6, "sdpa_math": 20e-6})
    monkeypatch.setattr(fa, "run_attention", run)
    monkeypatch.setattr(fa, "resolve_attention_backend",
                        lambda backend, device, mask="none": MEASURED if backend == "auto" and mask != "bool"
                        else backends.resolve_attention_backend(backend, device, mask))
    monkeypatch.setattr(fa, "CANDIDATES", lambda q, k, v, mask: ["wrong", "native", "sdpa", "sdpa_math"])
    monkeypatch.setattr(fa, "TIMER", timer)
    return ran, timer, fresh_choices


def test_auto_measures_once_and_runs_the_choice(measured_on_cpu):
    ran, timer, cache_dir = measured_on_cpu
    q, k, v = _qkv()
    expected = oracles.attention(q, k, v, 40 ** -0.5)
    out = fa.fused_attention(q, k, v)
    assert_rel_close(out, expected, torch.float32, "auto")
    assert ran[-1] == "native" and "wrong" in ran  # measured every candidate, then ran the choice
    assert timer.calls["native"] == attention_choice.DEFAULT_REPS and timer.calls["sdpa_math"] == 1
    [row] = fa.attention_choices()
    assert (row["backend"], row["source"], row["calls"], row["q"], row["mask"]) == ("native", "measured", 1,
                                                                                     [2, 2, 9, 40], "none")
    assert row["rejected"]["wrong"].startswith("wrong: relative error 1.00e-02")
    ran.clear()
    timer.calls.clear()
    fa.fused_attention(q, k, v)
    assert ran == ["native"] and timer.calls == {}  # cached: no second measurement
    assert fa.attention_choices()[0]["calls"] == 2
    # Another shape is another choice; a transposed view (other strides) too.
    fa.fused_attention(*_qkv(lq=5))
    fa.fused_attention(q.transpose(1, 2).contiguous().transpose(1, 2), k, v)
    assert len(fa.attention_choices()) == 3
    # A new process (memory cleared) reads the file: no measurement.
    fa.clear_attention_choices()
    ran.clear()
    timer.calls.clear()
    fa.fused_attention(q, k, v)
    assert ran == ["native"] and timer.calls == {}
    assert fa.attention_choices()[0]["source"] == "disk"
    assert (cache_dir / attention_choice.CACHE_FILE_NAME).exists()


@pytest.mark.parametrize("guard", ["compiling", "capturing", "sync_debug"])
def test_no_measurement_during_capture_or_compile(measured_on_cpu, monkeypatch, guard):
    ran, timer, _ = measured_on_cpu
    q, k, v = _qkv()
    with monkeypatch.context() as guarded:
        if guard == "compiling":
            guarded.setattr(torch.compiler, "is_compiling", lambda: True)
        else:
            guarded.setattr(torch.cuda, "is_available", lambda: True)
            guarded.setattr(torch.cuda, "is_current_stream_capturing", lambda: guard == "capturing")
            guarded.setattr(torch.cuda, "get_sync_debug_mode", lambda: 2 if guard == "sync_debug" else 0)
        out = fa.fused_attention(q, k, v)
        assert timer.calls == {}
        assert ran == ["sdpa"]  # the static table's answer for fp32
        assert_rel_close(out, oracles.attention(q, k, v, 40 ** -0.5), torch.float32, "static")
        if guard == "compiling":
            assert fa.attention_choices() == []  # nothing written while tracing
        else:
            [row] = fa.attention_choices()
            assert row["source"] == "static" and "not measured" in row["rejected"]["*"]
    # Capture / compile over: the next eager call measures.
    fa.fused_attention(q, k, v)
    assert ran[-1] == "native" and timer.calls
    assert [r["source"] for r in fa.attention_choices()] == ["measured"]


def test_cached_choice_is_used_while_capturing(measured_on_cpu, monkeypatch):
    ran, timer, _ = measured_on_cpu
    q, k, v = _qkv()
    fa.fused_attention(q, k, v)  # eager: measured -> native
    ran.clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    fa.fused_attention(q, k, v)
    assert ran == ["native"]


def test_measurement_failure_falls_back_to_the_static_choice(measured_on_cpu, monkeypatch, caplog):
    ran, _, _ = measured_on_cpu
    monkeypatch.setattr(fa, "CANDIDATES", lambda q, k, v, mask: ["wrong"])
    q, k, v = _qkv()
    out = fa.fused_attention(q, k, v)  # no correct candidate: the user's call still runs
    assert ran[-1] == "sdpa" and "measuring" in caplog.text
    assert_rel_close(out, oracles.attention(q, k, v, 40 ** -0.5), torch.float32, "fallback")


def test_measurement_leaves_the_users_rng_and_autocast_alone(measured_on_cpu):
    q, k, v = _qkv()
    state = torch.get_rng_state()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fa.fused_attention(q, k, v)
    assert torch.equal(torch.get_rng_state(), state)
    assert fa.attention_choices()[0]["backend"] == "native"  # the float64 reference was not autocast to bf16


def test_reference_error_check_over_heads_and_broadcast_masks():
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=gen), torch.randn(2, 3, 7, 8, generator=gen),
               torch.randn(2, 3, 7, 8, generator=gen))
    for mask in (None, torch.randn(2, 1, 1, 7, generator=gen), torch.randn(1, 3, 5, 7, generator=gen)):
        check = fa._reference_error_fn(q, k, v, 0.3, mask)
        exact = oracles.attention(q, k, v, 0.3, mask)
        assert check(exact) < 1e-15
        off = exact.clone()
        off[1, 2] += 0.1  # one head of one sample wrong
        assert check(off) > 1e-3
    q3, k3, v3 = (t.reshape(6, *t.shape[2:]) for t in (q, k, v))
    mask3 = torch.randn(6, 1, 7, generator=gen)
    assert fa._reference_error_fn(q3, k3, v3, 0.3, mask3)(oracles.attention(q3, k3, v3, 0.3, mask3)) < 1e-15


# --------------------------------------------------------------------------------------------------
# SDPA backends run as asked, and leave torch's flags as they were
# --------------------------------------------------------------------------------------------------


def _sdp_flags():
    return [getattr(torch._C, f"_get_{name}_sdp_enabled")() for name in ("flash", "mem_efficient", "math", "cudnn")]


@pytest.mark.parametrize("backend", ["sdpa", "sdpa_math", "sdpa_flash"])
def test_sdpa_backends_on_cpu(backend):
    q, k, v = _qkv()
    mask = torch.randn(2, 1, 1, 77)
    before = _sdp_flags()
    for args in ((q, k, v), tuple(t.reshape(4, *t.shape[2:]) for t in (q, k, v))):  # 4-D and ldm's 3-D
        m = mask if args[0].dim() == 4 else mask.reshape(2, 1, 77).repeat(2, 1, 1)
        out = fa.fused_attention(*args, mask=m, backend=backend)
        assert out.shape == args[0].shape
        assert_rel_close(out, oracles.attention(*args, 40 ** -0.5, m), 1e-5, backend)
    assert _sdp_flags() == before


def test_only_one_sdpa_backend_inside_the_context():
    before = _sdp_flags()
    with fa._OnlySdpBackend("MATH"):
        assert _sdp_flags() == [False, False, True, False]
    assert _sdp_flags() == before
    with pytest.raises(RuntimeError, match=r"'sdpa_efficient' \(SDPBackend.EFFICIENT_ATTENTION\) has no kernel"):
        fa.fused_attention(*_qkv(), backend="sdpa_efficient")  # no CPU kernel
    assert _sdp_flags() == before


def test_auto_respects_sdpa_backends_the_user_turned_off():
    torch.backends.cuda.enable_flash_sdp(False)
    try:
        assert "sdpa_flash" not in fa.attention_candidates(*_qkv(), None)
        assert "sdpa_math" in fa.attention_candidates(*_qkv(), None)
    finally:
        torch.backends.cuda.enable_flash_sdp(True)
    assert "sdpa_flash" in fa.attention_candidates(*_qkv(), None)


# --------------------------------------------------------------------------------------------------
# The processors and the ldm patch run the chosen backend
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def count_backends(monkeypatch, fresh_choices):
    ran = []
    real_run = fa.run_attention
    monkeypatch.setattr(fa, "run_attention", lambda backend, *a: ran.append(backend) or real_run(backend, *a))
    return ran


def test_diffusers_processor_runs_the_chosen_backend(measured_on_cpu):
    pytest.importorskip("diffusers")
    from diffusers.models.attention_processor import Attention

    ran = measured_on_cpu[0]
    attn = Attention(query_dim=32, cross_attention_dim=24, heads=2, dim_head=40).eval()
    x, context = torch.randn(2, 16, 32), torch.randn(2, 77, 24)
    with torch.no_grad():
        expected = attn(x, encoder_hidden_states=context)
        attn.set_processor(ddim_fast.FusedAttnProcessor())
        attn(x, encoder_hidden_states=context)  # measures the candidates, then runs the choice
        assert "wrong" in ran and ran[-1] == "native"
        ran.clear()
        for _ in range(2):
            got = attn(x, encoder_hidden_states=context)
    assert ran == ["native", "native"]  # no second measurement
    assert_rel_close(got, expected, 1e-5, "processor")
    assert fa.attention_choices()[0]["calls"] == 3
    attn.set_processor(ddim_fast.FusedAttnProcessor("fused"))
    ran.clear()
    with torch.no_grad():
        attn(x, encoder_hidden_states=context)
    assert ran == ["native"]  # forced: our kernel, no choice


def test_processors_on_cpu_run_sdpa_and_ldm_bool_masks_our_kernel(count_backends):
    pytest.importorskip("diffusers")
    from diffusers.models.attention_processor import Attention
    from test_attention_patchers import TinyLdmBlock

    attn = Attention(query_dim=32, heads=2, dim_head=16).eval()
    attn.set_processor(ddim_fast.FusedAttnProcessor())
    with torch.no_grad():
        attn(torch.randn(2, 12, 32))
        attn(torch.randn(2, 12, 32), attention_mask=torch.zeros(2, 1, 12))
    assert count_backends == ["sdpa", "sdpa"]
    count_backends.clear()
    model = TinyLdmBlock().eval()
    ddim_fast.patch_attention(model)
    with torch.no_grad():
        model(torch.randn(2, 10, 32), torch.randn(2, 77, 24))
        model(torch.randn(2, 10, 32), torch.randn(2, 77, 24), torch.rand(2, 77) > 0.5)
    assert count_backends == ["sdpa", "sdpa", "sdpa", "native"]
    rows = fa.attention_choices()
    assert {(r["mask"].split()[0], r["backend"], r["source"]) for r in rows} >= {("bool", "native", "rule"),
                                                                                 ("none", "sdpa", "rule")}
    ddim_fast.patch_attention(model, backend="fused")  # already patched: takes the new backend
    count_backends.clear()
    with torch.no_grad():
        model(torch.randn(2, 10, 32), torch.randn(2, 77, 24))
    assert count_backends == ["native", "native"]


def test_softmax_op_is_reached_only_when_called():
    """No ddim_fast attention path dispatches the softmax op (0.88x ldm's einsum path on the H200)."""
    pytest.importorskip("diffusers")
    from diffusers.models.attention_processor import Attention
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func._schema.name)
            return func(*args, **(kwargs or {}))

    from test_attention_patchers import TinyLdmBlock

    attn = Attention(query_dim=32, heads=2, dim_head=16).eval()
    model = TinyLdmBlock().eval()
    for backend in ("auto", "fused"):
        attn.set_processor(ddim_fast.FusedAttnProcessor(backend))
        ddim_fast.patch_attention(model, backend=backend)
        with torch.no_grad(), Ops():
            attn(torch.randn(2, 12, 32))
            model(torch.randn(2, 10, 32), torch.randn(2, 77, 24), torch.rand(2, 77) > 0.5)
    assert seen and not any("scaled_masked_softmax" in name for name in seen)
