"""What the training-step parity test detects: run by hand, not by pytest.

    .venv/bin/python tests/parity/mutation_check.py [frozen|trained|unfrozen] [MUTATION ...]

Each mutation deliberately changes one rule of the dino_keras side (through the test's
`keras_hook`) and runs the same comparison as test_train_step_parity.py; every mutation must
be reported as detected and the unmutated run ("none") must pass. About 25 s per mutation on
2 cores. The hooks reach into DinoOptimizer's internals, so they follow its implementation.
"""

from __future__ import annotations

import os
import pathlib
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.modules.setdefault("triton", None)  # see conftest.py

import keras  # noqa: E402
import test_train_step_parity as parity  # noqa: E402

VARIANTS = {
    "frozen": dict(freeze_last_layer=1, norm_last_layer=True, steps_per_epoch=3),
    "trained": dict(freeze_last_layer=0, norm_last_layer=False, steps_per_epoch=3),
    "unfrozen": dict(
        freeze_last_layer=1,
        norm_last_layer=True,
        steps_per_epoch=2,
        warmup_teacher_temp=0.04,
        teacher_temp=0.07,
        warmup_teacher_temp_epochs=2,
    ),
}


class _OneStepLate(keras.optimizers.schedules.LearningRateSchedule):
    def __init__(self, schedule):
        self.schedule = schedule

    def __call__(self, step):
        return self.schedule(step + 1)


def _set(attribute, value):
    return lambda trainer: setattr(trainer.optimizer, attribute, value)


def _decay_none(trainer):
    trainer.optimizer._decayed = [False] * len(trainer.optimizer._decayed)


def _decay_all(trainer):
    trainer.optimizer._decayed = [True] * len(trainer.optimizer._decayed)


def _decay_one_step_late(trainer):
    optimizer = trainer.optimizer
    schedule = optimizer.weight_decay_schedule
    optimizer.current_weight_decay = lambda: schedule(optimizer.iterations + 1)


def _lr_one_step_late(trainer):
    trainer.optimizer._learning_rate = _OneStepLate(trainer.optimizer._learning_rate)


def _momentum_one_step_late(trainer):
    momentum = trainer.momentum_schedule
    trainer.momentum_schedule = lambda step: momentum(step + 1)


def _center_momentum(trainer):
    trainer.dino_loss.center_momentum = 0.91


def _no_temperature_warmup(trainer):
    trainer.warmup_teacher_temp_epochs = 0


def _bias_correction_counts_frozen_steps(trainer):
    optimizer = trainer.optimizer
    for step, frozen in zip(optimizer._steps, optimizer._frozen_early, strict=True):
        if frozen:
            step.assign(optimizer.freeze_last_layer_steps)


MUTATIONS = {
    "none": lambda trainer: None,
    "no_clip": _set("clip_grad", 0.0),
    "clip_4.5": _set("clip_grad", 4.5),
    "no_weight_decay": _decay_none,
    "decay_on_biases_and_norms": _decay_all,
    "weight_decay_one_step_late": _decay_one_step_late,
    "lr_one_step_late": _lr_one_step_late,
    "momentum_one_step_late": _momentum_one_step_late,
    "center_momentum_0.91": _center_momentum,
    "no_last_layer_freeze": _set("freeze_last_layer_steps", 0),
    "freeze_one_step_longer": _set("freeze_last_layer_steps", 3),
    "no_teacher_temp_warmup": _no_temperature_warmup,
    "bias_correction_counts_frozen_steps": _bias_correction_counts_frozen_steps,
}
ONLY_FOR = {
    "no_last_layer_freeze": ("frozen", "unfrozen"),
    "freeze_one_step_longer": ("unfrozen",),
    "no_teacher_temp_warmup": ("unfrozen",),
    "bias_correction_counts_frozen_steps": ("unfrozen",),
}


def main(argv: list[str]) -> int:
    variant = argv[0] if argv else "frozen"
    names = argv[1:] or [m for m in MUTATIONS if variant in ONLY_FOR.get(m, (variant,))]
    failures = 0
    for name in names:
        measured = parity.measure(
            pathlib.Path(tempfile.mkdtemp()), keras_hook=MUTATIONS[name], **VARIANTS[variant]
        )
        try:
            parity.assert_parity(measured, name, lambda _, value: value)
            outcome = "passes" if name == "none" else "NOT DETECTED"
        except AssertionError as error:
            outcome = f"detected ({str(error).splitlines()[0][:60] or 'assertion'})"
        failures += (name == "none") != (outcome == "passes")
        print(
            f"{variant:8s} {name:36s} loss {measured.loss_error:.1e} "
            f"weights {max(measured.weight_errors.values()):.1e} "
            f"changes {max(measured.change_errors.values()):.1e} "
            f"centre {measured.center_error:.1e} -> {outcome}",
            flush=True,
        )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
