"""The command-line tools of ``python -m ddim_fast`` (demo, profile, bench, info, generate) and what only
they use: the embedded demo model (``toy_data``), the UNet configs and timers of the benchmarks.

Product code (``ddim_fast.ops``, the samplers, graphs, attention) never imports from here.
"""
