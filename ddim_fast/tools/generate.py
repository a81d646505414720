"""``python -m ddim_fast generate``: many images, one process or many (``torchrun``), the same image per seed
whatever the number of processes, the batch size, or an interruption.

    python -m ddim_fast generate --out DIR --num-samples 1000
    torchrun --nproc-per-node 8 -m ddim_fast generate --out DIR --prompts prompts.jsonl --resume

What is guaranteed: sample i is a function of its own seed, prompt and the job's settings only. Its initial
latents and every step's noise come from its own generator (``torch.Generator().manual_seed(seed)``, one per
sample; with ``--noise philox`` its own Philox seed row), never from its position in a batch, its process or
the run it was generated in. The embedded model computes in float64 and gives bit-identical pixels for any
batch size; a UNet's kernels may round differently at different batch sizes (cuBLAS picks algorithms per
shape), so for bit-identical reruns of a UNet keep ``--batch-size`` fixed; the noise is per sample anyway.

Work split: sample i runs on rank i % world_size; ranks never wait on each other while sampling (no
collective inside the loop: a rank with fewer samples just finishes). Rank 0 shows one progress bar for
the whole job, updated from every rank's counters in the torch.distributed store at batch boundaries, then
merges the per-rank manifests into ``manifest.jsonl`` and prints a summary line.

Outputs in ``--out``: one PNG per sample named by its global index, written atomically (temporary file, then
rename); ``job.json`` (the settings that define the job: a directory holds one job); ``manifest.jsonl``, one
row per sample: index, file, prompt, negative_prompt, seed, guidance, steps, eta, model, noise, height,
width, sha256 (of the pixels: "HxWxC:" + the uint8 RGB bytes) and file_sha256 (of the PNG file). While a
job runs each rank appends its rows to ``manifest.rank<r>.jsonl`` (after the image is renamed into place),
so a run killed at any moment loses at most the batches in flight; ``--resume`` skips every sample whose
file and row exist and match, and works with ``torchrun --max-restarts``.

A job is its settings without the number of samples (``JOB_IDENTITY``): ``--resume`` with a larger
``--num-samples`` extends it (samples 0..n-1 keep their seeds, hence their images; the new ones are made);
with a smaller one the run completes the first ``--num-samples`` samples and leaves the others as they are
(job.json keeps the larger count; nothing is deleted).
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import sys
import time
from typing import Any, Iterable

import torch

from ddim_fast import _checks
from ddim_fast.tools import figures

MANIFEST = "manifest.jsonl"
JOB = "job.json"
NOISE_MODES = ("torch", "philox")
# Fields of a manifest row that must equal the job's for a sample to count as done.
_ROW_SETTINGS = ("prompt", "negative_prompt", "seed", "guidance", "steps", "eta", "model", "noise")


class GenerateError(ValueError):
    """Bad input for generate: raised before any sample is produced, with nothing written."""


@dataclasses.dataclass(frozen=True)
class Sample:
    """One image to make: its global index and everything its pixels depend on."""

    index: int
    prompt: str
    negative_prompt: str | None
    seed: int
    guidance: float


# --------------------------------------------------------------------------------------------------
# Input: prompts, samples, the job
# --------------------------------------------------------------------------------------------------


def read_prompts(path: str) -> list[dict[str, Any]]:
    """A prompts file: one prompt per line (blank lines skipped), or JSONL (``.jsonl`` / ``.json`` files,
    or every non-blank line starting with ``{``) with ``prompt`` and optional ``negative_prompt``, ``seed``,
    ``guidance``. Errors name the file and the line."""
    if not os.path.isfile(path):
        raise GenerateError(f"--prompts {path}: no such file")
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    if not numbered:
        raise GenerateError(f"--prompts {path}: the file holds no prompt")
    jsonl = path.endswith((".jsonl", ".json")) or all(line.lstrip().startswith("{") for _, line in numbered)
    if not jsonl:
        return [{"prompt": line.strip()} for _, line in numbered]
    rows = []
    for n, line in numbered:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise GenerateError(f"--prompts {path}, line {n}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise GenerateError(f"--prompts {path}, line {n}: expected an object with a string 'prompt'")
        unknown = set(row) - {"prompt", "negative_prompt", "seed", "guidance"}
        if unknown:
            raise GenerateError(f"--prompts {path}, line {n}: unknown keys {sorted(unknown)} (allowed: prompt, "
                                "negative_prompt, seed, guidance)")
        if "seed" in row and (isinstance(row["seed"], bool) or not isinstance(row["seed"], int) or row["seed"] < 0):
            raise GenerateError(f"--prompts {path}, line {n}: seed must be an int >= 0, got {row['seed']!r}")
        if "guidance" in row:
            try:
                row["guidance"] = _checks.finite_float("generate", "guidance", row["guidance"])
            except (TypeError, ValueError) as exc:
                raise GenerateError(f"--prompts {path}, line {n}: {exc}") from None
        if row.get("negative_prompt") is not None and not isinstance(row["negative_prompt"], str):
            raise GenerateError(f"--prompts {path}, line {n}: negative_prompt must be a string")
        rows.append(row)
    return rows


def make_samples(prompts: list[dict[str, Any]] | None, num_samples: int | None, seed: int, guidance: float,
                 default_prompt) -> list[Sample]:
    """Sample i: prompt i (cycled when --num-samples exceeds the file), seed ``seed + i`` unless the row says."""
    if prompts is None and num_samples is None:
        raise GenerateError("give --num-samples N, or --prompts FILE")
    count = len(prompts) if num_samples is None else num_samples
    if count < 1:
        raise GenerateError(f"--num-samples must be >= 1, got {count}")
    out = []
    for i in range(count):
        row = prompts[i % len(prompts)] if prompts else {"prompt": default_prompt(i)}
        out.append(Sample(i, row["prompt"], row.get("negative_prompt"),
                          int(row["seed"]) if "seed" in row else seed + i,
                          float(row.get("guidance", guidance))))
    return out


# What defines a job: sample i is a function of these and of i alone (make_samples: prompt row i % rows,
# seed --seed + i unless the row says), so the number of samples is not part of it: a job can grow
# (a larger --num-samples with --resume) without changing a sample it already has.
JOB_IDENTITY = ("model", "steps", "eta", "noise", "seed", "guidance", "prompts_sha256")


def job_settings(args, prompts: list[dict[str, Any]] | None, num_samples: int) -> dict[str, Any]:
    """job.json: the job's identity (``JOB_IDENTITY``) and its number of samples (everything but the batch
    size and the number of processes, which change no pixel)."""
    digest = None if prompts is None else hashlib.sha256(
        json.dumps(prompts, sort_keys=True).encode()).hexdigest()
    return {"model": args.model, "steps": args.steps, "eta": args.eta, "noise": args.noise, "seed": args.seed,
            "guidance": args.guidance, "prompts_sha256": digest, "num_samples": num_samples}


def legacy_job_settings(args, samples: list[Sample]) -> dict[str, Any]:
    """job.json as versions before job extension wrote it (the samples' digest instead of the rule that
    makes them): a directory written so is recognised, and its job.json rewritten in today's form."""
    digest = hashlib.sha256(json.dumps([dataclasses.astuple(s) for s in samples]).encode()).hexdigest()
    return {"model": args.model, "steps": args.steps, "eta": args.eta, "noise": args.noise,
            "num_samples": len(samples), "samples_sha256": digest}


# --------------------------------------------------------------------------------------------------
# The output directory
# --------------------------------------------------------------------------------------------------


def image_name(index: int, total: int) -> str:
    return f"{index:0{max(6, len(str(total - 1)))}d}.png"


def is_image_name(name: Any, index: int) -> bool:
    """``name`` is sample ``index``'s file at any width (a job extended past 10**6 samples names its new
    files one digit wider and keeps the old ones)."""
    return (isinstance(name, str) and name.endswith(".png") and name[:-4].isdigit() and len(name) >= 10
            and int(name[:-4]) == index)


def pixel_sha256(pixels: torch.Tensor) -> str:
    """SHA-256 of uint8 [H, W, C] pixels, their shape included."""
    h, w, c = pixels.shape
    return hashlib.sha256(f"{h}x{w}x{c}:".encode() + pixels.contiguous().numpy().tobytes()).hexdigest()


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _read_rows(path: str) -> Iterable[dict[str, Any]]:
    """Manifest rows of one file; a line cut short by a kill (the last one of a shard) is skipped."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("index"), int):
                yield row


class OutputDir:
    """``--out``: images, job.json, manifest.jsonl and the per-rank shards of the running job."""

    def __init__(self, path: str):
        self.path = path

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def shards(self) -> list[str]:
        return sorted(glob.glob(self.file("manifest.rank*.jsonl")))

    def existing_job(self) -> dict[str, Any] | None:
        if not os.path.exists(self.file(JOB)):
            return None
        try:
            with open(self.file(JOB), encoding="utf-8") as f:
                return json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise GenerateError(f"--out {self.path}: {JOB} is unreadable ({exc}); it is not this tool's output "
                                "or is damaged: choose another directory") from None

    def rows(self) -> dict[int, dict[str, Any]]:
        """Every recorded row by index (shards after the merged manifest: the latest row wins)."""
        rows: dict[int, dict[str, Any]] = {}
        for path in [self.file(MANIFEST)] * os.path.exists(self.file(MANIFEST)) + self.shards():
            for row in _read_rows(path):
                rows[row["index"]] = row
        return rows

    def check(self, settings: dict[str, Any], resume: bool, legacy=None) -> dict[str, Any] | None:
        """Refuse, before any work, a directory that holds another job, or this job without --resume.
        Returns the job found there (its job.json; None for a new directory). The same job with another
        number of samples is this job (``JOB_IDENTITY``): extended or completed in part by the caller.
        ``legacy(n)``: job.json as older versions wrote it for this job's first n samples
        (:func:`legacy_job_settings`), to recognise their directories."""
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise GenerateError(f"--out {self.path} exists and is not a directory")
        job = self.existing_job()
        has_results = bool(job) or os.path.exists(self.file(MANIFEST)) or bool(self.shards())
        if not has_results:
            return None
        differing = None
        if (isinstance(job, dict) and "samples_sha256" in job and legacy is not None
                and isinstance(job.get("num_samples"), int) and job["num_samples"] > 0):
            expected = legacy(job["num_samples"])  # an older version's job.json: is it this job's?
            differing = sorted(k for k in set(job) | set(expected) if job.get(k) != expected.get(k))
            if not differing:
                job = dict(settings, num_samples=job["num_samples"])
        found = job if isinstance(job, dict) else {}
        if not job or any(found.get(k) != settings.get(k) for k in JOB_IDENTITY) or not isinstance(
                found.get("num_samples"), int):
            if not differing:
                differing = sorted(k for k in JOB_IDENTITY if found.get(k) != settings.get(k))
            raise GenerateError(f"--out {self.path} holds the outputs of a different job (its {JOB} differs in "
                                f"{', '.join(differing) or 'everything'}); nothing was changed: use another "
                                "directory")
        if not resume:
            size = found["num_samples"]
            how = ("complete it" if size == settings["num_samples"] else
                   f"extend it from {size} to {settings['num_samples']} samples" if size < settings["num_samples"]
                   else f"complete its first {settings['num_samples']} of {size} samples")
            raise GenerateError(f"--out {self.path} already holds this job's results; pass --resume to {how} "
                                "(finished samples are kept), or choose another directory")
        return found

    def done(self, samples: list[Sample], settings: dict[str, Any]) -> set[int]:
        """Indices whose image exists, whose row matches the sample and the job, and whose file hashes right."""
        rows = self.rows()
        done = set()
        for s in samples:
            row = rows.get(s.index)
            if row is None or not is_image_name(row.get("file"), s.index):
                continue
            expected = _row_settings(s, settings)
            if any(row.get(k) != expected[k] for k in _ROW_SETTINGS):
                continue
            path = self.file(row["file"])
            if os.path.exists(path) and file_sha256(path) == row.get("file_sha256"):
                done.add(s.index)
        return done

    def write_job(self, settings: dict[str, Any]) -> None:
        os.makedirs(self.path, exist_ok=True)
        tmp = self.file(f"{JOB}.tmp-{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(settings, f, indent=2)
        os.replace(tmp, self.file(JOB))

    def remove_stale_temporaries(self, rank: int, world: int) -> None:
        """Half-written images of a killed run (``NNNNNN.png.tmp-PID``) of this rank's samples."""
        for tmp in glob.glob(self.file("*.png.tmp-*")):
            stem = os.path.basename(tmp).split(".", 1)[0]
            if stem.isdigit() and int(stem) % world == rank:
                os.remove(tmp)

    def merge(self) -> int:
        """manifest.jsonl := every row by index (atomically), then the shards are removed. Returns the count."""
        rows = self.rows()
        tmp = self.file(f"{MANIFEST}.tmp-{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as f:
            for index in sorted(rows):
                f.write(json.dumps(rows[index], sort_keys=True) + "\n")
        os.replace(tmp, self.file(MANIFEST))
        for shard in self.shards():
            os.remove(shard)
        return len(rows)


def _row_settings(s: Sample, settings: dict[str, Any]) -> dict[str, Any]:
    return {"prompt": s.prompt, "negative_prompt": s.negative_prompt, "seed": s.seed, "guidance": s.guidance,
            "steps": settings["steps"], "eta": settings["eta"], "model": settings["model"],
            "noise": settings["noise"]}


# --------------------------------------------------------------------------------------------------
# Models: the embedded model (FastDDIMSampler) and diffusers pipeline folders (FastDDIMScheduler)
# --------------------------------------------------------------------------------------------------


def _to_pixels(images: torch.Tensor) -> list[torch.Tensor]:
    """[-1, 1] floats [B, C, H, W] -> B uint8 [H, W, 3] tensors."""
    return list(figures.to_uint8(images))


class EmbeddedModel:
    """The demo's embedded model: prompts are class names ('rings', ...) or '' for unconditional samples."""

    def __init__(self, device: torch.device, noise: str, size: int = 32):
        from ddim_fast.sampler import FastDDIMSampler
        from ddim_fast.tools import toy_data

        self.toy = toy_data
        self.model = toy_data.EmbeddedLdmModel(size=size, device=device)
        self.sampler = FastDDIMSampler(self.model, "linear", device, noise_mode=noise)
        self.device = device
        self.num_train_timesteps = self.model.num_timesteps

    @staticmethod
    def default_prompt(i: int) -> str:
        from ddim_fast.tools import toy_data

        return toy_data.CLASS_NAMES[i % toy_data.NUM_CLASSES]

    def check_prompts(self, samples: list[Sample]) -> None:
        names = set(self.toy.CLASS_NAMES)
        for s in samples:
            if s.prompt not in names and s.prompt != "":
                raise GenerateError(f"sample {s.index}: the embedded model knows the prompts {sorted(names)} "
                                    f"(or '' for unconditional), got {s.prompt!r}")
            if s.negative_prompt:
                raise GenerateError(f"sample {s.index}: the embedded model takes no negative_prompt")

    def group_key(self, s: Sample):
        return (s.guidance, s.prompt == "")

    def generate(self, batch: list[Sample], steps: int, eta: float) -> list[torch.Tensor]:
        toy = self.toy
        unconditional = batch[0].prompt == ""
        n = len(batch)
        uncond = toy.class_embedding(None, n, device=self.device)
        cond = uncond if unconditional else toy.class_embedding(
            [toy.CLASS_NAMES.index(s.prompt) for s in batch], device=self.device)
        generators = [torch.Generator("cpu").manual_seed(s.seed) for s in batch]
        samples, _ = self.sampler.sample(
            steps, n, self.model.image_shape, conditioning=cond, eta=eta, verbose=False,
            unconditional_guidance_scale=1.0 if unconditional else batch[0].guidance,
            unconditional_conditioning=None if unconditional else uncond, generator=generators)
        return _to_pixels(samples)


class PipelineModel:
    """A diffusers pipeline folder (``save_pretrained`` layout: SD1.x/2.x/SDXL), loaded from disk only, run with
    ``FastDDIMScheduler`` (and ``ddim_fast.optimize`` where that exists)."""

    def __init__(self, path: str, device: torch.device):
        if not os.path.isfile(os.path.join(path, "model_index.json")):
            raise GenerateError(f"--model {path}: not a diffusers pipeline folder (no model_index.json; give a "
                                "folder written by pipe.save_pretrained, or 'embedded')")
        try:
            import diffusers
        except ImportError as exc:
            raise GenerateError(f"--model {path} needs diffusers: pip install 'ddim-fast[tools]'") from exc
        import ddim_fast
        from ddim_fast.scheduler import FastDDIMScheduler

        dtype = torch.float16 if device.type == "cuda" else torch.float32
        try:
            pipe = diffusers.DiffusionPipeline.from_pretrained(path, torch_dtype=dtype, local_files_only=True)
        except Exception as exc:  # a broken folder: say which and why, before any work
            raise GenerateError(f"--model {path}: cannot load the pipeline: {type(exc).__name__}: {exc}") from exc
        if not hasattr(pipe, "scheduler"):
            raise GenerateError(f"--model {path}: the pipeline has no scheduler to replace")
        pipe.scheduler = FastDDIMScheduler.from_config(pipe.scheduler.config)
        optimize = getattr(ddim_fast, "optimize", None)  # the one-call pipeline accelerator, where it exists
        pipe = pipe.to(device)
        if optimize is not None:
            optimize(pipe)
        pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe
        self.device = device
        self.num_train_timesteps = int(pipe.scheduler.config.num_train_timesteps)

    @staticmethod
    def default_prompt(i: int) -> str:
        return ""

    def check_prompts(self, samples: list[Sample]) -> None:
        return None

    def group_key(self, s: Sample):
        return (s.guidance, s.negative_prompt is None)

    def generate(self, batch: list[Sample], steps: int, eta: float) -> list[torch.Tensor]:
        negative = None if batch[0].negative_prompt is None else [s.negative_prompt for s in batch]
        generators = [torch.Generator("cpu").manual_seed(s.seed) for s in batch]
        out = self.pipe(prompt=[s.prompt for s in batch], negative_prompt=negative, generator=generators,
                        num_inference_steps=steps, eta=eta, guidance_scale=batch[0].guidance, output_type="pt")
        images = out.images if hasattr(out, "images") else out[0]
        return _to_pixels(images.float() * 2 - 1)


# --------------------------------------------------------------------------------------------------
# torch.distributed
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    store: Any = None
    prefix: str = "ddim_fast/generate"

    def add(self, key: str, amount: int) -> int:
        return int(self.store.add(f"{self.prefix}/{key}", amount)) if self.store is not None else amount

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def init_distributed(device_arg: str) -> tuple[Dist, torch.device]:
    """Join the torchrun job named by the environment (NCCL on GPUs, gloo on CPUs), or run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        from ddim_fast.tools import problems

        return Dist(), problems.resolve_device(device_arg)
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg not in ("auto", "cuda", "cpu"):
        raise GenerateError(f"--device {device_arg}: under torchrun give auto, cuda (cuda:LOCAL_RANK) or cpu")
    if device_arg == "cuda" and not torch.cuda.is_available():
        raise GenerateError("--device cuda: no CUDA device is available")
    use_cuda = torch.cuda.is_available() and device_arg in ("auto", "cuda")
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise GenerateError(f"local rank {local_rank} has no GPU: {torch.cuda.device_count()} visible, start at "
                                "most that many processes per node (--nproc-per-node) or use --device cpu")
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    # Counters of this attempt only: torchrun --max-restarts reuses the store across restarts.
    prefix = f"ddim_fast/generate/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, dist.distributed_c10d._get_default_store(),
                prefix), device


# --------------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------------


def _batches(samples: list[Sample], size: int, key) -> Iterable[list[Sample]]:
    """Consecutive samples in batches of at most ``size`` sharing ``key`` (one guidance per call)."""
    batch: list[Sample] = []
    for s in samples:
        if batch and (len(batch) == size or key(s) != key(batch[0])):
            yield batch
            batch = []
        batch.append(s)
    if batch:
        yield batch


def _validate_args(args) -> None:
    for name in ("steps", "batch_size"):
        value = getattr(args, name)
        if value < 1:
            raise GenerateError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.seed < 0:
        raise GenerateError(f"--seed must be >= 0, got {args.seed}")
    for name, minimum in (("eta", 0.0), ("guidance", None)):
        try:
            _checks.finite_float("generate", f"--{name}", getattr(args, name), minimum=minimum)
        except (TypeError, ValueError) as exc:
            raise GenerateError(str(exc)) from None


def run(args) -> dict[str, Any]:
    """The whole job on this rank; returns this rank's report (rank 0's has the job's summary)."""
    _validate_args(args)
    prompts = read_prompts(args.prompts) if args.prompts else None
    dist, device = init_distributed(args.device)
    model = EmbeddedModel(device, args.noise) if args.model == "embedded" else PipelineModel(args.model, device)
    samples = make_samples(prompts, args.num_samples, args.seed, args.guidance, model.default_prompt)
    model.check_prompts(samples)
    if args.steps > model.num_train_timesteps:
        raise GenerateError(f"--steps must be <= {model.num_train_timesteps} (the model's training timesteps), "
                            f"got {args.steps}")
    settings = job_settings(args, prompts, len(samples))
    out = OutputDir(args.out)
    found = out.check(settings, args.resume, legacy=lambda n: legacy_job_settings(
        args, make_samples(prompts, n, args.seed, args.guidance, model.default_prompt)))
    # A job grows with a larger --num-samples (sample i is the same image whatever the count) and never
    # shrinks: with a smaller one this run completes the first --num-samples samples and keeps the others.
    job_total = max(len(samples), found["num_samples"]) if found else len(samples)
    settings["num_samples"] = job_total
    dist.barrier()  # every rank has checked the directory before anyone writes to it
    if dist.rank == 0:
        out.write_job(settings)
    os.makedirs(args.out, exist_ok=True)
    out.remove_stale_temporaries(dist.rank, dist.world)
    done = out.done(samples, settings)
    mine = [s for s in samples if s.index % dist.world == dist.rank and s.index not in done]
    dist.barrier()  # job.json exists and every rank knows its work before the counters start

    progress = None
    if dist.rank == 0:
        from tqdm import tqdm

        progress = tqdm(total=len(samples), initial=len(done), desc="generate", unit="img", file=sys.stderr)
    shard = out.file(f"manifest.rank{dist.rank}.jsonl")
    start = time.perf_counter()
    generated = 0
    total = len(samples)
    if dist.rank == 0 and found and found["num_samples"] < total:
        print(f"generate: extending the job in {args.out} from {found['num_samples']} to {total} samples "
              "(the existing samples keep their seeds and images)", file=sys.stderr)
    with open(shard, "a", encoding="utf-8") as manifest:
        for batch in _batches(mine, args.batch_size, model.group_key):
            for s, pixels in zip(batch, model.generate(batch, args.steps, args.eta)):
                name = image_name(s.index, job_total)
                path = figures.save_png(pixels, out.file(name))
                row = dict(_row_settings(s, settings), index=s.index, file=name, height=int(pixels.shape[0]),
                           width=int(pixels.shape[1]), sha256=pixel_sha256(pixels), file_sha256=file_sha256(path))
                manifest.write(json.dumps(row, sort_keys=True) + "\n")
            manifest.flush()
            os.fsync(manifest.fileno())
            generated += len(batch)
            finished_so_far = dist.add("done", len(batch))
            if progress is not None:
                progress.n = len(done) + (finished_so_far if dist.store is not None else generated)
                progress.refresh()
    seconds = time.perf_counter() - start
    report = {"rank": dist.rank, "generated": generated, "seconds": seconds,
              "images_per_s": generated / seconds if seconds > 0 else 0.0}
    if dist.store is not None:
        dist.store.set(f"{dist.prefix}/stats/{dist.rank}", json.dumps(report))
        dist.add("finished", 1)
    if dist.rank != 0:
        return report

    # Rank 0: follow the others through the store (no barrier: a long tail must not hit a collective timeout).
    while dist.store is not None and dist.add("finished", 0) < dist.world:
        if progress is not None:
            progress.n = len(done) + dist.add("done", 0)
            progress.refresh()
        time.sleep(0.05)
    per_rank = [json.loads(dist.store.get(f"{dist.prefix}/stats/{r}")) for r in range(dist.world)] \
        if dist.store is not None else [report]
    new = sum(r["generated"] for r in per_rank)
    if progress is not None:
        progress.n = len(done) + new
        progress.close()
    rows = out.merge()
    wall = time.perf_counter() - start
    report.update(samples=total, job_samples=job_total, new=new, resumed=len(done), rows=rows, wall_seconds=wall,
                  job_images_per_s=new / wall if wall > 0 else 0.0,
                  per_rank_images_per_s=[round(r["images_per_s"], 3) for r in per_rank], world_size=dist.world)
    print(f"generate: {total} samples ({new} new, {len(done)} resumed) in {wall:.1f} s on {dist.world} "
          f"process{'es' if dist.world != 1 else ''}: {report['job_images_per_s']:.2f} images/s; per rank "
          + ", ".join(f"{r['rank']}: {r['images_per_s']:.2f}/s" for r in per_rank) + f"; manifest: {rows} rows")
    if job_total > total:
        print(f"generate: the job in {args.out} has {job_total} samples: this run completed its first {total} "
              f"(--num-samples {total}) and left the others as they are; --num-samples {job_total} --resume "
              "completes all of them")
    return report


def _model_argument(text: str) -> str:
    """--model: 'embedded' or a diffusers pipeline folder (checked here, before any work)."""
    import argparse

    if text != "embedded" and not os.path.isfile(os.path.join(text, "model_index.json")):
        raise argparse.ArgumentTypeError(f"{text} is not a diffusers pipeline folder (no model_index.json; give a "
                                         "folder written by pipe.save_pretrained, or 'embedded')")
    return text


def add_arguments(parser) -> None:
    from ddim_fast.tools import arguments

    parser.add_argument("--out", required=True, type=arguments.output_dir,
                        help="output directory (one job per directory)")
    parser.add_argument("--model", default="embedded", type=_model_argument,
                        help="'embedded' (the demo's model, no downloads) or a local diffusers pipeline folder")
    parser.add_argument("--prompts", default=None, metavar="FILE", type=arguments.existing_file,
                        help="one prompt per line, or JSONL with prompt, negative_prompt, seed, guidance (default: "
                             "the embedded model's class names in turn, '' for a pipeline)")
    parser.add_argument("--num-samples", type=arguments.positive_int, default=None,
                        help="number of samples; with --resume, a larger number extends the job (default: one per "
                             "prompt of --prompts)")
    parser.add_argument("--seed", type=arguments.non_negative_int, default=0,
                        help="sample i has seed SEED + i unless --prompts says")
    parser.add_argument("--steps", type=arguments.positive_int, default=50, help="DDIM steps")
    parser.add_argument("--eta", type=arguments.non_negative_float, default=0.0, help="DDIM eta (0: deterministic)")
    parser.add_argument("--guidance", type=arguments.finite_float, default=3.0,
                        help="classifier-free guidance scale")
    parser.add_argument("--batch-size", type=arguments.positive_int, default=8,
                        help="samples per model call on each process")
    parser.add_argument("--noise", default="torch", choices=NOISE_MODES,
                        help="step noise: torch (one torch.Generator per sample) or philox (in-kernel, one seed row "
                             "per sample)")
    parser.add_argument("--device", default="auto", type=arguments.device,
                        help="cpu, cuda or auto (under torchrun: cuda:LOCAL_RANK)")
    parser.add_argument("--resume", action="store_true",
                        help="complete or extend a job: skip samples already done")
    parser.add_argument("--json", metavar="FILE", default=None, type=arguments.output_file,
                        help="also write rank 0's report as JSON (default: none)")


def check_arguments(args) -> str | None:
    """What one option says about another, refused before any work (cli.main prints it as argparse does)."""
    from ddim_fast.tools import arguments

    if args.num_samples is None and args.prompts is None:
        return "one of the arguments --num-samples --prompts is required"
    if args.model == "embedded" and args.steps > arguments.MAX_STEPS:
        return (f"argument --steps: must be <= {arguments.MAX_STEPS} for the embedded model (its schedule has "
                f"{arguments.MAX_STEPS} training timesteps), got {args.steps}")
    return None


def main(args) -> int:
    try:
        report = run(args)
    except GenerateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json and report.get("rank", 0) == 0:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    return 0


__all__ = ["run", "read_prompts", "make_samples", "OutputDir", "Sample", "GenerateError"]
