"""A diffusers pipeline's own ``pipe(...)`` call, timed plain, after ``ddim_fast.optimize(pipe)`` and with
``torch.compile(pipe.unet)`` for reference (pytest-benchmark).

Groups (baseline: ``plain``):

* ``pipeline cpu tiny-sd``: a StableDiffusionPipeline with tiny random-weight components (UNet (32, 64), CPU,
  fp32, 1 torch thread, 32 px, CFG 7.5, 10 steps, output_type="latent"). On the CPU the graph path runs
  eagerly over static buffers, so this row shows what optimize costs or saves without a GPU (the fused step
  and attention, the static-buffer copies). The torch.compile entry is skipped with CI=1 (inductor needs
  minutes to compile on two cores).
* ``pipeline cuda sd15 fp16 512px``: the SD1.5-config pipeline (SD1.5's UNet with random weights, fp16,
  512 x 512, CFG 7.5, 50 steps, batch 1, output_type="latent"); torch.compile in diffusers' recommended
  ``mode="reduce-overhead", fullgraph=True``. Skipped without CUDA. Goal: optimize >= 1.3x plain's it/s.

``DDIM_FAST_BENCH_NO_COMPILE=1`` skips the torch.compile entries (compiling SD1.5's UNet takes a minute or two
of a time-boxed device run).

Every entry proves what it ran before it is timed (plain: diffusers' scheduler and processors, eager
forward; optimize: fused scheduler, attention modules on ``FusedAttnProcessor`` counted and the backend each
attention shape ran (``attention_backends``: our kernel or an SDPA backend, from
``ddim_fast.attention.attention_choices()``), every UNet call through the graph path, captured on CUDA;
compile: an OptimizedModule with at least one Dynamo frame compiled) and checks its
latents against plain's (fp32: 1e-5 relative, fp16: 1e-2). Per entry: it/s, ms per step, the UNet's own time
per step under the same variant, and the model-free overhead per step (the difference: scheduler, guidance,
the pipeline's Python). The ratios to plain are printed at the end with the hardware named.

    pytest benchmarks/bench_pipeline.py --benchmark-only
"""

from __future__ import annotations

import os
import statistics
import time

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import ddim_fast  # noqa: E402
from conftest import IN_CI, hardware_name, requires_cuda, versions  # noqa: E402
from ddim_fast.reference import relative_error  # noqa: E402

diffusers = pytest.importorskip("diffusers")

from ddim_fast.tools.bench import SD15_UNET_CONFIG, SD_SCHEDULER_CONFIG  # noqa: E402

VARIANTS = ("plain", "optimize", "torch.compile")
GUIDANCE = 7.5
TOLERANCES = {torch.float32: 1e-5, torch.float16: 1e-2}

TINY_UNET_CONFIG = dict(
    sample_size=16, in_channels=4, out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(32, 64), layers_per_block=1,
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)


class Setup:
    """One pipeline and the inputs of its call; ``unet_inputs`` are what the pipeline's UNet sees per step."""

    def __init__(self, name, device, dtype, unet_config, text_tokens, text_dim, resolution, steps, vae_blocks):
        self.name, self.device, self.dtype, self.steps, self.resolution = name, torch.device(device), dtype, steps, \
            resolution
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            unet = diffusers.UNet2DConditionModel(**unet_config)
            # Never decoded (output_type="latent"): the VAE only sets vae_scale_factor, so it is made small.
            vae = diffusers.AutoencoderKL(block_out_channels=(32,) * vae_blocks, latent_channels=4, norm_num_groups=8,
                                          down_block_types=("DownEncoderBlock2D",) * vae_blocks,
                                          up_block_types=("UpDecoderBlock2D",) * vae_blocks)
        self.pipe = diffusers.StableDiffusionPipeline(
            vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=diffusers.DDIMScheduler(**SD_SCHEDULER_CONFIG),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        verbosity = diffusers.utils.logging.get_verbosity()
        diffusers.utils.logging.set_verbosity_error()  # the .to(dtype) of config-built models warns
        try:
            self.pipe.to(device=self.device, dtype=dtype)
        finally:
            diffusers.utils.logging.set_verbosity(verbosity)
        self.pipe.unet.eval().requires_grad_(False)
        self.pipe.set_progress_bar_config(disable=True)
        gen = torch.Generator().manual_seed(1)
        self.embeds = {key: torch.randn(1, text_tokens, text_dim, generator=gen).to(self.device, dtype)
                       for key in ("prompt_embeds", "negative_prompt_embeds")}
        latent = resolution // 2 ** (vae_blocks - 1)
        self.unet_inputs = (torch.randn(2, 4, latent, latent, generator=gen).to(self.device, dtype),
                            torch.tensor(500, device=self.device),
                            torch.cat([self.embeds["negative_prompt_embeds"], self.embeds["prompt_embeds"]]))
        self.original_unet = self.pipe.unet
        self.expected = None

    def synchronize(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @torch.no_grad()
    def run(self) -> torch.Tensor:
        out = self.pipe(**self.embeds, height=self.resolution, width=self.resolution, num_inference_steps=self.steps,
                        guidance_scale=GUIDANCE, generator=torch.Generator(self.device).manual_seed(0),
                        output_type="latent").images
        self.synchronize()
        return out

    @torch.no_grad()
    def unet_seconds_per_step(self, repeats: int = 5) -> float:
        """The pipeline's UNet (as the variant left it) alone: median over `repeats` of ``steps`` calls on the
        step's inputs (the same statistic as the pipeline's median, so the difference is the overhead)."""
        x, t, cond = self.unet_inputs
        self.pipe.unet(x, t, encoder_hidden_states=cond)
        samples = []
        for _ in range(repeats):
            self.synchronize()
            t0 = time.perf_counter()
            for _ in range(self.steps):
                self.pipe.unet(x, t, encoder_hidden_states=cond)
            self.synchronize()
            samples.append((time.perf_counter() - t0) / self.steps)
        return sorted(samples)[len(samples) // 2]


RESULTS: list[dict] = []


class _Summary:
    """Prints each group's entries with their ratio to ``plain`` after the run (registered by the first test)."""

    def pytest_terminal_summary(self, terminalreporter):
        if not RESULTS:
            return
        tr = terminalreporter
        tr.section("ddim-fast pipeline benchmarks: pipe(...) per step, ratios to plain")
        for group in dict.fromkeys(r["group"] for r in RESULTS):
            rows = [r for r in RESULTS if r["group"] == group]
            base = next((r for r in rows if r["variant"] == "plain"), None)
            tr.write_line(f"[{group}] on {rows[0]['hardware']}")
            if "vs_plain_wall" in rows[0]:  # the interleaved CPU group: medians, and ratios with their noise
                for r in rows:
                    tr.write_line(f"  {r['variant']:<18} {r['ms_per_step']:8.3f} ms/step wall, {r['cpu_ms_per_step']:8.3f} "
                                  f"ms/step CPU  vs plain: wall {r['vs_plain_wall']}; CPU {r['vs_plain_cpu']}")
                continue
            for r in rows:
                ratio = f"{base['ms_per_step'] / r['ms_per_step']:5.2f}x plain's it/s" if base else ""
                tr.write_line(f"  {r['variant']:<14} {r['it_per_s']:8.1f} it/s  {r['ms_per_step']:8.3f} ms/step  "
                              f"UNet alone {r['unet_ms_per_step']:8.3f} ms  overhead {r['overhead_ms_per_step']:7.3f} "
                              f"ms/step  {ratio}")


def _register_summary(config):
    if not config.pluginmanager.has_plugin("ddim-fast-pipeline-summary"):
        config.pluginmanager.register(_Summary(), "ddim-fast-pipeline-summary")


def _prepare(setup: Setup, variant: str) -> dict:
    """Puts the pipeline in the variant's state and returns what proves it."""
    pipe = setup.pipe
    if ddim_fast.optimized_state(pipe) is not None:
        ddim_fast.restore(pipe)
    pipe.unet = setup.original_unet
    if variant == "plain":
        assert type(pipe.scheduler) is diffusers.DDIMScheduler and "forward" not in pipe.unet.__dict__
        return {"scheduler": type(pipe.scheduler).__name__,
                "attn_processors": sorted({type(p).__name__ for p in pipe.unet.attn_processors.values()})}
    if variant == "optimize":
        ddim_fast.attention.clear_attention_choices()  # the proof lists what this run chose
        ddim_fast.optimize(pipe)
        state = ddim_fast.optimized_state(pipe)
        return {"scheduler": type(pipe.scheduler).__name__, "fused_attention_modules": state.fused_attention_count}
    if os.environ.get("DDIM_FAST_BENCH_NO_COMPILE"):
        pytest.skip("DDIM_FAST_BENCH_NO_COMPILE is set")
    if setup.device.type == "cpu" and IN_CI:
        pytest.skip("torch.compile on the CPU compiles for minutes on two cores; run without CI=1")
    torch._dynamo.reset()
    kwargs = {"mode": "reduce-overhead", "fullgraph": True} if setup.device.type == "cuda" else {}
    pipe.unet = torch.compile(setup.original_unet, **kwargs)
    return {"scheduler": type(pipe.scheduler).__name__, "compile_options": kwargs}


def _check_ran(setup: Setup, variant: str, proof: dict) -> None:
    pipe = setup.pipe
    if variant == "optimize":
        state = ddim_fast.optimized_state(pipe)
        graphed = state.graphed["unet"]
        proof["choices"] = {k: str(v) for k, v in state.choices["unet"].items()}
        assert proof["scheduler"] == "FastDDIMScheduler"
        if setup.device.type != "cuda":
            _check_cpu_defaults(state)
            return
        assert graphed.eager_calls == 0 and graphed.cache.misses >= 1, "optimize: UNet calls passed through"
        captured = [graphed.cache.get(key).captured for key in graphed.cache.keys()]
        assert proof["fused_attention_modules"] > 0
        assert all(captured), "optimize: the UNet was not captured into a CUDA graph (see the warning logged)"
        proof["cuda_graph_entries"] = len(captured)
        proof["cuda_graph_captured"] = all(captured)
        # What the fused processors ran, per attention shape of the UNet (chosen per shape: our kernel or SDPA).
        choices = ddim_fast.attention.attention_choices()
        assert choices, "optimize: no attention call went through FusedAttnProcessor"
        proof["attention_backends"] = {f"{c['dtype']} q{c['q']} k{c['k']}": f"{c['backend']} ({c['source']})"
                                       for c in choices}
    elif variant == "torch.compile":
        from torch._dynamo.eval_frame import OptimizedModule
        from torch._dynamo.utils import counters

        frames = sum(counters["frames"].values()) if "frames" in counters else 0
        assert isinstance(pipe.unet, OptimizedModule) and counters["stats"]["unique_graphs"] >= 1, \
            "torch.compile: nothing was compiled"
        proof["dynamo_unique_graphs"] = int(counters["stats"]["unique_graphs"])
        proof["dynamo_frames"] = int(frames)


def _bench(benchmark, request, setup: Setup, variant: str, group: str, rounds: int):
    _register_summary(request.config)
    proof = _prepare(setup, variant)
    try:
        out = setup.run()  # also the warm-up: captures, compiles
        _check_ran(setup, variant, proof)
        if variant == "plain":
            setup.expected = out
        elif setup.expected is not None:
            err = relative_error(out, setup.expected)
            assert err <= TOLERANCES[setup.dtype], f"{variant}: latents differ from plain's by {err:.2e}"
            proof["rel_error_vs_plain"] = err
        benchmark.group = group
        benchmark.pedantic(setup.run, rounds=rounds, iterations=1, warmup_rounds=1)
        seconds = benchmark.stats.stats.median
        unet = setup.unet_seconds_per_step()
    finally:
        if ddim_fast.optimized_state(setup.pipe) is not None:
            ddim_fast.restore(setup.pipe)
        setup.pipe.unet = setup.original_unet
    per_step = seconds / setup.steps
    row = {"group": group, "variant": variant, "hardware": hardware_name(setup.device),
           "it_per_s": setup.steps / seconds, "ms_per_step": per_step * 1e3, "unet_ms_per_step": unet * 1e3,
           "overhead_ms_per_step": (per_step - unet) * 1e3}
    RESULTS.append(row)
    benchmark.extra_info.update({
        **{k: v for k, v in row.items() if k != "group"}, **{f"{k}_version": v for k, v in versions().items()},
        "diffusers_version": diffusers.__version__, "pipeline": setup.name, "steps": setup.steps,
        "resolution": setup.resolution, "dtype": str(setup.dtype).replace("torch.", ""), "guidance": GUIDANCE,
        "batch": 1, "torch_threads": torch.get_num_threads(), "baseline": variant == "plain", **proof,
    })


# --------------------------------------------------------------------------------------------------
# CPU: tiny pipeline
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_setup():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the project's CPU convention: one thread, comparable across loaded machines
    yield Setup("tiny-sd", "cpu", torch.float32, TINY_UNET_CONFIG, text_tokens=8, text_dim=32, resolution=32,
                steps=10, vae_blocks=2)
    torch.set_num_threads(threads)


@pytest.mark.parametrize("variant", VARIANTS)
def test_pipeline_cpu_tiny(benchmark, request, tiny_setup, variant):
    _bench(benchmark, request, tiny_setup, variant, "pipeline cpu tiny-sd fp32 32px cfg7.5 10 steps",
           rounds=5 if IN_CI else 15)


def _check_cpu_defaults(state) -> None:
    """optimize(pipe)'s CPU defaults: the fused scheduler only; the graph wrapper passes CPU calls straight through."""
    graphed = state.graphed["unet"]
    assert not state.attention and not state.qkv and not state.channels_last, state.summary
    assert graphed.cache.misses == 0 and graphed.eager_calls > 0, "optimize: CPU calls went through static buffers"


def _noise_phrase(ratio: float, spread: float) -> str:
    """'the same' when the ratio of medians is inside the measured spread, else 'N.NNx faster/slower'."""
    from ddim_fast.tools.figures import ratio_phrase

    if abs(ratio - 1.0) <= spread:
        return f"the same (ratio {ratio:.3f}, noise +-{spread:.1%})"
    return f"{ratio_phrase(ratio).strip()} (noise +-{spread:.1%})"


CPU_OPTIMIZE_GROUP = "pipeline cpu tiny-sd fp32 32px cfg7.5 10 steps: optimize(pipe) vs plain, interleaved"
# What optimize(pipe) does on the CPU, and what its CUDA defaults would do there (for the record: the reason they
# are off on the CPU).
CPU_INTERLEAVED = {
    "plain": None,
    "optimize": {},
    "optimize(all on)": dict(attention=True, cuda_graph=True, channels_last=True, fuse_qkv=True),
}


def test_pipeline_cpu_tiny_optimize_vs_plain(benchmark, request, tiny_setup):
    """Never slower than plain on the CPU: plain and optimize(pipe) alternate round by round in one process (a
    shared machine's load drifts over minutes), wall and CPU-thread time per step. The summary prints each
    variant's ratio to plain as "the same" when it is inside the noise (the larger relative interquartile
    half-range of the two), else N.NNx faster / slower. optimize(all on) is optimize's CUDA defaults forced on
    the CPU: why they are off there."""
    _register_summary(request.config)
    setup = tiny_setup
    pipe = setup.pipe
    rounds = 5 if IN_CI else 15
    wall: dict[str, list] = {name: [] for name in CPU_INTERLEAVED}
    cpu: dict[str, list] = {name: [] for name in CPU_INTERLEAVED}
    proof: dict = {}

    def one_round():
        for name, options in CPU_INTERLEAVED.items():
            if options is not None:
                ddim_fast.optimize(pipe, **options)
            try:
                setup.run()  # warm-up of this variant's state (first call after optimize)
                t0, c0 = time.perf_counter(), time.thread_time()
                out = setup.run()
                wall[name].append((time.perf_counter() - t0) / setup.steps)
                cpu[name].append((time.thread_time() - c0) / setup.steps)
                if options is not None:
                    state = ddim_fast.optimized_state(pipe)
                    if name == "optimize":
                        _check_cpu_defaults(state)
                    proof[name] = {"summary": state.summary,
                                   "rel_error_vs_plain": relative_error(out, proof["plain_out"])}
                else:
                    proof["plain_out"] = out
            finally:
                if ddim_fast.optimized_state(pipe) is not None:
                    ddim_fast.restore(pipe)

    benchmark.group = CPU_OPTIMIZE_GROUP
    benchmark.pedantic(one_round, rounds=rounds, iterations=1, warmup_rounds=0)
    proof.pop("plain_out")
    assert proof["optimize"]["rel_error_vs_plain"] == 0.0, "optimize(pipe)'s CPU defaults must give plain's latents"
    assert proof["optimize(all on)"]["rel_error_vs_plain"] <= TOLERANCES[setup.dtype]

    def stats(samples):
        ordered = sorted(samples)
        median = statistics.median(ordered)
        q1, q3 = ordered[len(ordered) // 4], ordered[(3 * len(ordered)) // 4]
        return median, (q3 - q1) / 2 / median

    base_wall, base_wall_spread = stats(wall["plain"])
    base_cpu, base_cpu_spread = stats(cpu["plain"])
    for name in CPU_INTERLEAVED:
        med_wall, spread_wall = stats(wall[name])
        med_cpu, spread_cpu = stats(cpu[name])
        row = {"group": CPU_OPTIMIZE_GROUP, "variant": name, "hardware": hardware_name(setup.device),
               "it_per_s": 1 / med_wall, "ms_per_step": med_wall * 1e3, "cpu_ms_per_step": med_cpu * 1e3,
               "vs_plain_wall": _noise_phrase(base_wall / med_wall, max(spread_wall, base_wall_spread)),
               "vs_plain_cpu": _noise_phrase(base_cpu / med_cpu, max(spread_cpu, base_cpu_spread))}
        RESULTS.append(row)
        benchmark.extra_info[name] = {**{k: v for k, v in row.items() if k != "group"}, **proof.get(name, {})}
    benchmark.extra_info.update({"hardware": hardware_name(setup.device), "rounds": rounds, "steps": setup.steps,
                                 "torch_threads": torch.get_num_threads(),
                                 **{f"{k}_version": v for k, v in versions().items()}})


# --------------------------------------------------------------------------------------------------
# GPU: SD1.5-config pipeline, fp16, 512 px, CFG 7.5, 50 steps
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd15_setup():
    return Setup("sd15", "cuda", torch.float16, SD15_UNET_CONFIG, text_tokens=77, text_dim=768, resolution=512,
                 steps=50, vae_blocks=4)


@requires_cuda
@pytest.mark.parametrize("variant", VARIANTS)
def test_pipeline_cuda_sd15(benchmark, request, sd15_setup, variant):
    _bench(benchmark, request, sd15_setup, variant, "pipeline cuda sd15 fp16 512px cfg7.5 50 steps", rounds=3)
