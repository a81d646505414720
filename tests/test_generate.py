"""``python -m ddim_fast generate`` on torch.distributed (gloo, CPU): sample i's image depends on its seed alone,
whatever the number of processes or nodes, the batch size, or a SIGKILL and ``--resume``; bad input fails
before any work and leaves existing outputs untouched."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ddim_fast.tools import cli, generate

ROOT = Path(__file__).resolve().parents[1]
# Small and quick, but with step noise (eta > 0) so the per-sample noise streams are exercised too.
# --device cpu everywhere: gloo processes on the CPU (a GPU machine has one GPU, not one per test process).
JOB = ["--num-samples", "10", "--steps", "8", "--eta", "0.5", "--seed", "100", "--device", "cpu"]


def _env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["OMP_NUM_THREADS"] = "1"
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(out: Path, *args: str, nproc: int = 1, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), *extra,
           "-m", "ddim_fast", "generate", "--out", str(out), "--device", "cpu", *args]
    if not extra:
        cmd[3:3] = ["--master-port", str(_free_port())]
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 120) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


def _contents(out: Path) -> tuple[dict[str, str], list[dict]]:
    """(file name -> sha256 of each PNG, manifest rows) of a finished job."""
    files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.png"))}
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    return files, rows


def _generate_in_process(out: Path, *args: str) -> int:
    """The exit status of ``generate`` (argparse's refusals exit with status 2 before any work: returned too)."""
    try:
        return cli.main(["generate", "--out", str(out), "--device", "cpu", *args])
    except SystemExit as exc:
        return exc.code


@pytest.fixture(scope="module")
def reference_job(tmp_path_factory):
    """The job run once in this process, batch size 4: what every other way of running it must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    assert _generate_in_process(out, *JOB, "--batch-size", "4") == 0
    files, rows = _contents(out)
    assert len(files) == 10 and [r["index"] for r in rows] == list(range(10))
    assert [r["seed"] for r in rows] == list(range(100, 110))
    return files, rows


def test_one_and_two_processes_and_any_batch_size_give_the_same_images(tmp_path, reference_job):
    one = _torchrun(tmp_path / "one", *JOB, "--batch-size", "3", nproc=1)
    two = _torchrun(tmp_path / "two", *JOB, "--batch-size", "2", nproc=2)
    out_two = _finish(two)
    _finish(one)
    assert "on 2 processes" in out_two and "images/s; per rank 0:" in out_two and ", 1: " in out_two
    assert _contents(tmp_path / "one") == reference_job
    assert _contents(tmp_path / "two") == reference_job
    assert not list((tmp_path / "two").glob("manifest.rank*"))  # merged by rank 0


def test_two_nodes_with_c10d_rendezvous(tmp_path, reference_job):
    endpoint = f"127.0.0.1:{_free_port()}"
    rdzv = ("--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "ddim-fast-test")
    nodes = [_torchrun(tmp_path / "job", *JOB, "--batch-size", "5", extra=rdzv) for _ in range(2)]
    outputs = [_finish(node) for node in nodes]
    assert sum("on 2 processes" in out for out in outputs) == 1  # one summary, from rank 0
    assert _contents(tmp_path / "job") == reference_job


def test_sigkill_half_way_then_resume_equals_an_uninterrupted_run(tmp_path):
    job = ["--num-samples", "24", "--steps", "40", "--eta", "0.5", "--seed", "7", "--batch-size", "1"]
    assert _generate_in_process(tmp_path / "whole", *job) == 0
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "ddim_fast", "generate", "--out", str(killed), "--device", "cpu",
                             *job], cwd=ROOT,
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shard = killed / "manifest.rank0.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if shard.exists() and len(shard.read_text().splitlines()) >= 6:
            break
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done_before = len(list(killed.glob("*.png")))
    assert 0 < done_before < 24, f"the kill landed outside the run ({done_before} images): not a half-way kill"
    assert not (killed / "manifest.jsonl").exists()
    # Without --resume the directory is refused (nothing is overwritten) ...
    assert _generate_in_process(killed, *job) == 2
    # ... with it, the job completes, on another number of processes and batch size.
    _finish(_torchrun(killed, *job[:-2], "--batch-size", "3", "--resume", nproc=2))
    assert _contents(killed) == _contents(tmp_path / "whole")


def test_resume_of_a_finished_job_does_nothing_and_redoes_a_damaged_image(tmp_path, capsys):
    assert _generate_in_process(tmp_path, *JOB) == 0
    before = _contents(tmp_path)
    assert _generate_in_process(tmp_path, *JOB, "--resume") == 0
    assert "(0 new, 10 resumed)" in capsys.readouterr().out
    (tmp_path / "000003.png").write_bytes(b"not a png")
    assert _generate_in_process(tmp_path, *JOB, "--resume") == 0
    assert "(1 new, 9 resumed)" in capsys.readouterr().out
    assert _contents(tmp_path) == before


def _job_with(num_samples: int) -> list[str]:
    return ["--num-samples", str(num_samples), *JOB[2:]]


def test_resume_extends_a_job_and_equals_an_uninterrupted_run(tmp_path, capsys, reference_job):
    # 4 samples, then the same job extended to 10 with --resume: sample i keeps seed --seed + i, so the
    # directory ends up as the 10-sample job run in one go (files, pixels, manifest rows).
    assert _generate_in_process(tmp_path, *_job_with(4), "--batch-size", "3") == 0
    first = _contents(tmp_path)
    assert len(first[0]) == 4 and json.loads((tmp_path / "job.json").read_text())["num_samples"] == 4
    capsys.readouterr()
    before = _tree(tmp_path)
    # Without --resume nothing changes, and the message says how to extend it.
    assert _generate_in_process(tmp_path, *_job_with(10)) == 2
    assert "pass --resume to extend it from 4 to 10 samples" in capsys.readouterr().err
    assert _tree(tmp_path) == before
    assert _generate_in_process(tmp_path, *_job_with(10), "--batch-size", "3", "--resume") == 0
    captured = capsys.readouterr()
    assert "(6 new, 4 resumed)" in captured.out and "manifest: 10 rows" in captured.out
    assert "extending the job" in captured.err
    assert _contents(tmp_path) == reference_job
    assert {k: v for k, v in _contents(tmp_path)[0].items() if k in first[0]} == first[0]  # old files untouched
    assert json.loads((tmp_path / "job.json").read_text())["num_samples"] == 10


def test_resume_with_fewer_samples_completes_those_and_keeps_the_rest(tmp_path, capsys):
    # The job never shrinks (nothing a user has is deleted): a smaller --num-samples completes the first N
    # samples, keeps the others and says how to complete the whole job.
    assert _generate_in_process(tmp_path, *_job_with(6)) == 0
    before = _contents(tmp_path)
    (tmp_path / "000001.png").unlink()  # damaged inside the first 3 ...
    (tmp_path / "000005.png").write_bytes(b"not a png")  # ... and outside them
    capsys.readouterr()
    assert _generate_in_process(tmp_path, *_job_with(3), "--resume") == 0
    out = capsys.readouterr().out
    assert "3 samples (1 new, 2 resumed)" in out and "manifest: 6 rows" in out
    assert "has 6 samples: this run completed its first 3" in out and "--num-samples 6 --resume" in out
    assert json.loads((tmp_path / "job.json").read_text())["num_samples"] == 6
    files, rows = _contents(tmp_path)
    assert files["000001.png"] == before[0]["000001.png"] and rows == before[1]
    assert (tmp_path / "000005.png").read_bytes() == b"not a png"  # left as it is: not part of this run
    assert _generate_in_process(tmp_path, *_job_with(6), "--resume") == 0
    assert "(1 new, 5 resumed)" in capsys.readouterr().out and _contents(tmp_path) == before


def test_a_job_json_of_an_earlier_version_is_recognised(tmp_path, capsys):
    # Directories written before jobs could grow pinned a digest of their samples: still this job.
    import argparse

    assert _generate_in_process(tmp_path, *_job_with(3)) == 0
    args = argparse.Namespace(model="embedded", steps=8, eta=0.5, noise="torch")
    samples = generate.make_samples(None, 3, 100, 3.0, generate.EmbeddedModel.default_prompt)
    (tmp_path / "job.json").write_text(json.dumps(generate.legacy_job_settings(args, samples)))
    capsys.readouterr()
    assert _generate_in_process(tmp_path, *_job_with(4), "--resume") == 0
    assert "(1 new, 3 resumed)" in capsys.readouterr().out
    job = json.loads((tmp_path / "job.json").read_text())
    assert job["num_samples"] == 4 and "samples_sha256" not in job and job["seed"] == 100
    (tmp_path / "job.json").write_text(json.dumps(dict(generate.legacy_job_settings(args, samples), steps=9)))
    assert _generate_in_process(tmp_path, *_job_with(4), "--resume") == 2  # another job's: refused
    assert "holds the outputs of a different job (its job.json differs in steps)" in \
        capsys.readouterr().err


def test_prompt_files_text_and_jsonl(tmp_path):
    text = tmp_path / "prompts.txt"
    text.write_text("rings\n\ncrosses\n")
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text('{"prompt": "rings", "seed": 5}\n{"prompt": "", "guidance": 1.0}\n')
    assert _generate_in_process(tmp_path / "a", "--prompts", str(text), "--steps", "4") == 0
    rows = _contents(tmp_path / "a")[1]
    assert [(r["prompt"], r["seed"]) for r in rows] == [("rings", 0), ("crosses", 1)]
    assert _generate_in_process(tmp_path / "b", "--prompts", str(jsonl), "--steps", "4", "--seed", "50") == 0
    rows = _contents(tmp_path / "b")[1]
    assert [(r["prompt"], r["seed"], r["guidance"]) for r in rows] == [("rings", 5, 3.0), ("", 51, 1.0)]
    # The same sample (rings, seed 5) cycled from a longer --num-samples job is the same image.
    assert _generate_in_process(tmp_path / "c", "--prompts", str(jsonl), "--steps", "4", "--seed", "50",
                                "--num-samples", "3") == 0
    assert _contents(tmp_path / "c")[0]["000000.png"] == _contents(tmp_path / "b")[0]["000000.png"]


def _tree(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", ["missing_prompts", "bad_jsonl", "zero_samples", "other_job", "not_a_pipeline",
                                  "unknown_class", "same_job_without_resume", "bad_eta"])
def test_bad_input_fails_clearly_before_any_work(tmp_path, capsys, case):
    out = tmp_path / "out"
    assert _generate_in_process(out, "--num-samples", "3", "--steps", "3") == 0
    before = _tree(out)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "rings"}\n{"prompt": "rings", "seed": -1}\n')
    args, message = {
        "missing_prompts": (["--prompts", str(tmp_path / "nope.txt")], "argument --prompts: no such file: "),
        "bad_jsonl": (["--prompts", str(prompts)], "p.jsonl, line 2: seed must be an int >= 0, got -1"),
        "zero_samples": (["--num-samples", "0"], "argument --num-samples: must be >= 1, got 0"),
        "other_job": (["--num-samples", "3", "--steps", "4"], "holds the outputs of a different job (its job.json "
                                                               "differs in steps); nothing was changed"),
        "not_a_pipeline": (["--model", str(tmp_path), "--num-samples", "3"],
                           "argument --model: " + str(tmp_path) + " is not a diffusers pipeline folder"),
        "unknown_class": (["--prompts", str(_write(tmp_path / "q.txt", "a cat\n"))], "knows the prompts"),
        "same_job_without_resume": (["--num-samples", "3", "--steps", "3"], "pass --resume to complete it"),
        "bad_eta": (["--num-samples", "3", "--eta", "nan"], "argument --eta: must be a finite number, got nan"),
    }[case]
    if case == "bad_jsonl":
        bad = tmp_path / "broken.jsonl"
        bad.write_text('{"prompt": "rings"}\n{"prompt": "rings",\n')
        assert _generate_in_process(out, "--prompts", str(bad)) == 2
        assert "broken.jsonl, line 2: not valid JSON" in capsys.readouterr().err
    capsys.readouterr()
    assert _generate_in_process(out, *args) == 2
    assert message in capsys.readouterr().err
    assert _tree(out) == before, "existing outputs were changed"


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_make_samples_and_batches():
    samples = generate.make_samples([{"prompt": "a", "guidance": 2.0}, {"prompt": "b"}], 5, 10, 3.0, str)
    assert [(s.index, s.prompt, s.seed, s.guidance) for s in samples] == [
        (0, "a", 10, 2.0), (1, "b", 11, 3.0), (2, "a", 12, 2.0), (3, "b", 13, 3.0), (4, "a", 14, 2.0)]
    batches = list(generate._batches(samples, 2, key=lambda s: s.guidance))
    assert [[s.index for s in b] for b in batches] == [[0], [1], [2], [3], [4]]  # one guidance per call
    assert [[s.index for s in b] for b in generate._batches(samples[1::2], 2, key=lambda s: s.guidance)] == [[1, 3]]
