"""The benchmark harness of the ddim-fast repository: what ``python -m ddim_fast bench`` runs and what the
pytest-benchmark suites beside it (``benchmarks/bench_*.py``) share. Measurement code, not part of the
installed package (the wheel ships ``ddim_fast/`` only): the package's ``bench`` command loads it from a
checkout (``ddim_fast.tools.bench.load_harness``), the suites import it directly (pytest puts ``benchmarks/``
on ``sys.path``).

* :mod:`harness.proofs`: what a variant really ran (dispatcher op counts, model forwards, captured CUDA
  graphs, Dynamo's counters);
* :mod:`harness.loops`: the end-to-end sampling loops (diffusers', the reference, ``FastDDIMSampler`` eager,
  graphed, with fused attention) as proven :class:`~harness.loops.Variant` objects;
* :mod:`harness.e2e`: ``bench``'s run: every loop on one problem, interleaved timing, the report;
* :mod:`harness.pipelines`: a diffusers pipeline's ``pipe(...)`` plain, optimized, compiled, diffusers'
  recipe, each proven (``benchmarks/bench_pipeline.py``);
* :mod:`harness.breakdown`: ``bench --breakdown``: where one UNet step's time goes, by kind of kernel.

The pieces ``profile``, ``demo`` and ``generate`` share (UNet configs, problems, the reference and
FastDDIMSampler loops, the step timers) stay in the package: ``ddim_fast.tools.problems`` and
``ddim_fast.tools.timing``.
"""
