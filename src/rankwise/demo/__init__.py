"""``rankwise demo``: the knowledge study end to end on the embedded synthetic world.

    rankwise demo [--out runs/demo] [--scale cpu|gpu] [--fresh] [--force] [--threads N]

:mod:`rankwise.demo.protocol` makes it ``rankwise study`` on the world's config (``study: world``);
:mod:`rankwise.demo.run` runs the stages (world and base model, mastery, data, the arms
for every seed, evaluation, restoration, analysis); :mod:`rankwise.demo.report` turns
their per-fact results into accuracies with intervals, the findings with verdicts, the
plots and ``report.md``. The study uses the library's public API only.
"""
from .protocol import add_arguments, main, run_world, validate_world, world_config
from .run import DEMO, SCALE_SETTINGS, arm_config, plan_arms, run_demo, settings_for

__all__ = ["DEMO", "SCALE_SETTINGS", "add_arguments", "arm_config", "main", "plan_arms", "run_demo", "run_world",
           "settings_for", "validate_world", "world_config"]
