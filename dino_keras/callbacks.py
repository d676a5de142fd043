"""Keras callbacks of a DINO run. They observe the training; none takes part in the step:
evaluation, logging, checkpoints, NaN stop, memory release while the step compiles."""

from __future__ import annotations

import logging
import math
import time

import keras
import tensorflow as tf

from dino_keras import memory, run_dir

log = logging.getLogger(__name__)


class RunLog:
    """Appends one JSON object per evaluated/trained epoch to `log.jsonl` and mirrors the
    scalars to TensorBoard (`<output_dir>/tensorboard`)."""

    def __init__(self, output_dir: str, enabled: bool = True):
        self.path = run_dir.join(output_dir, run_dir.LOG_FILE)
        self.enabled = enabled
        self.writer = (
            tf.summary.create_file_writer(run_dir.join(output_dir, run_dir.TENSORBOARD_DIR))
            if enabled
            else None
        )

    def write(self, epoch: int, values: dict) -> dict:
        record = {"epoch": epoch, **{k: _to_python(v) for k, v in values.items()}}
        if not self.enabled:
            return record
        run_dir.append_jsonl(self.path, record)
        with self.writer.as_default(step=epoch):
            for name, value in record.items():
                if name != "epoch" and isinstance(value, (int, float)):
                    tf.summary.scalar(name, value)
        self.writer.flush()
        return record

    def records(self) -> list[dict]:
        """The logged records, one per epoch: an epoch repeated after a restart keeps its last
        record; a line cut short by a killed process is skipped."""
        by_epoch: dict[tuple, dict] = {}
        for record in run_dir.read_jsonl(self.path):
            # k-NN-only records (epoch 0) and epoch records are kept apart.
            key = (record.get("epoch"), "loss" in record)
            by_epoch.pop(key, None)
            by_epoch[key] = record
        return sorted(by_epoch.values(), key=lambda r: (r.get("epoch", 0), "loss" in r))


def _to_python(value):
    if hasattr(value, "numpy"):
        value = value.numpy()
    if hasattr(value, "item"):
        value = value.item()
    return value


class KnnEvaluation(keras.callbacks.Callback):
    """Teacher k-NN accuracy at epoch 0 (before training), every `every` epochs and at the
    end, added to the epoch logs as `knn_top1` / `knn_top5`, with the raw-pixel k-NN on the
    same bank as `knn_top1_pixels`."""

    def __init__(
        self,
        evaluator,
        run_log: RunLog,
        every: int,
        epochs: int,
        k: int,
        evaluate_at_start: bool = True,
        verbose: bool = True,
    ):
        super().__init__()
        self.evaluate_at_start = evaluate_at_start
        self.verbose = verbose
        self.evaluator = evaluator
        self.run_log = run_log
        self.every = every
        self.epochs = epochs
        self.k = k
        self.results: dict[int, dict] = {}

    def evaluate(self, epoch: int) -> dict:
        """The teacher's k-NN result, with the raw-pixel k-NN on the same bank as `pixels_top1`."""
        start = time.time()
        result = dict(self.evaluator(self.model.teacher.backbone))
        result["pixels_top1"] = self.evaluator.pixel_baseline()["top1"]
        self.results[epoch] = result
        if self.verbose:
            print(
                f"Teacher k-NN@{self.k} after epoch {epoch}: top-1 {result['top1']:.2f}%, "
                f"top-5 {result['top5']:.2f}% (raw pixels: top-1 {result['pixels_top1']:.2f}%; "
                f"{time.time() - start:.0f} s)",
                flush=True,
            )
        return result

    @staticmethod
    def log_values(result: dict) -> dict:
        return {
            "knn_top1": result["top1"],
            "knn_top5": result["top5"],
            "knn_top1_pixels": result["pixels_top1"],
        }

    def on_train_begin(self, logs=None):
        if self.evaluate_at_start and 0 not in self.results:
            self.run_log.write(0, self.log_values(self.evaluate(0)))

    def on_epoch_end(self, epoch, logs=None):
        done = epoch + 1
        if done == self.epochs or (self.every and done % self.every == 0):
            result = self.evaluate(done)
            if logs is not None:
                logs.update(self.log_values(result))


class EpochLog(keras.callbacks.Callback):
    """Writes each epoch's logs (loss, schedules, collapse monitors, k-NN) to the `RunLog`."""

    def __init__(self, run_log: RunLog):
        super().__init__()
        self.run_log = run_log
        self._start = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.time()

    def on_epoch_end(self, epoch, logs=None):
        values = dict(logs or {})
        values["epoch_seconds"] = time.time() - self._start
        self.run_log.write(epoch + 1, values)


class SaveCheckpoints(keras.callbacks.Callback):
    """Saves the latest checkpoint every epoch and keeps one every `keep_every` epochs."""

    def __init__(self, training_checkpoint, keep_every: int):
        super().__init__()
        self.training_checkpoint = training_checkpoint
        self.keep_every = keep_every

    def on_epoch_end(self, epoch, logs=None):
        self.training_checkpoint.save(epoch + 1, keep=(epoch + 1) % self.keep_every == 0)


class SaveBackups(keras.callbacks.Callback):
    """Writes a preemption backup every `every` optimiser steps (`TrainingCheckpoint.save_backup`).

    Runs after `StopOnNonFiniteLoss`, so a diverged state is never backed up.
    """

    def __init__(self, training_checkpoint, every: int, steps_per_epoch: int):
        super().__init__()
        self.training_checkpoint = training_checkpoint
        self.every = every
        self.steps_per_epoch = steps_per_epoch

    def on_train_begin(self, logs=None):
        self._previous_step = int(self.model.optimizer.iterations.numpy())

    def on_train_batch_end(self, batch, logs=None):
        # With steps_per_execution > 1 the step can jump over a multiple of `every`.
        step = int(self.model.optimizer.iterations.numpy())
        crossed = step // self.every > self._previous_step // self.every
        self._previous_step = step
        if crossed and step % self.steps_per_epoch:
            # (at an epoch's end the epoch checkpoint is the backup)
            self.training_checkpoint.save_backup(step // self.steps_per_epoch)


class NonFiniteLossError(RuntimeError):
    pass


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Stops training with an error naming the step when the loss is NaN or infinite.

    The last checkpoint and backup, written before the step, are left untouched.
    """

    def __init__(self, steps_per_epoch: int, checkpoint_dir: str):
        super().__init__()
        self.steps_per_epoch = steps_per_epoch
        self.checkpoint_dir = checkpoint_dir

    def on_train_batch_end(self, batch, logs=None):
        loss = _to_python((logs or {}).get("loss", 0.0))
        if not math.isfinite(loss):
            step = int(self.model.optimizer.iterations.numpy())
            epoch, in_epoch = divmod(step - 1, self.steps_per_epoch)
            raise NonFiniteLossError(
                f"loss is {loss} at step {step} (epoch {epoch + 1}, batch {in_epoch + 1}); "
                f"training stopped. The last good checkpoint in {self.checkpoint_dir} is intact."
            )


# Uniform collapse: every teacher distribution is near uniform (entropy near ln K) and the
# student matches it (KL near 0). One-hot collapse: the batch-mean teacher distribution sits on
# a few prototypes (its entropy near 0).
UNIFORM_ENTROPY_FRACTION = 0.97
UNIFORM_MAX_KL = 0.02
ONE_HOT_ENTROPY_FRACTION = 0.05


def collapse_state(logs: dict, out_dim: int) -> tuple[str, str] | None:
    """("uniform" | "one-hot", the figures that say so) from an epoch's monitors, or None."""
    max_entropy = math.log(out_dim)
    entropy = _to_python(logs.get("teacher_entropy", math.nan))
    batch_entropy = _to_python(logs.get("teacher_batch_entropy", math.nan))
    kl = _to_python(logs.get("kl_teacher_student", math.nan))
    if entropy >= UNIFORM_ENTROPY_FRACTION * max_entropy and kl <= UNIFORM_MAX_KL:
        return "uniform", (
            f"teacher entropy {entropy:.3f} of ln({out_dim}) = {max_entropy:.3f}, "
            f"KL(teacher || student) {kl:.4f}"
        )
    if batch_entropy <= ONE_HOT_ENTROPY_FRACTION * max_entropy:
        return "one-hot", (
            f"entropy of the batch-mean teacher distribution {batch_entropy:.3f} "
            f"of ln({out_dim}) = {max_entropy:.3f}"
        )
    return None


COLLAPSE_CURES = {
    "uniform": (
        "--koleo_loss_weight=0.1, --centering=sinkhorn_knopp, a lower --teacher_temp, "
        "a lower --momentum_teacher or --lr, fewer prototypes (--out_dim)"
    ),
    "one-hot": (
        "--centering=sinkhorn_knopp, a higher --teacher_temp or a longer "
        "--warmup_teacher_temp_epochs, a lower --lr"
    ),
}


class CollapseGuard(keras.callbacks.Callback):
    """After each epoch, reads the collapse monitors and warns on a collapsed state.

    The warning is one line naming the state, the figures and the flags that usually cure it;
    the state goes into the epoch's logs as `collapse` (so into log.jsonl and summary.json).
    With `stop` the run stops after the epoch, its checkpoint written as usual.
    """

    def __init__(self, out_dim: int, stop: bool = False, verbose: bool = True):
        super().__init__()
        self.out_dim = out_dim
        self.stop = stop
        self.verbose = verbose
        self.stopped_on_collapse = False

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        found = collapse_state(logs, self.out_dim)
        if found is None:
            return
        state, figures = found
        logs["collapse"] = state
        message = (
            f"WARNING: DINO has collapsed ({state}) after epoch {epoch + 1}: {figures}. "
            f"Usually cured by {COLLAPSE_CURES[state]}."
        )
        if self.stop:
            self.model.stop_training = True
            self.stopped_on_collapse = True
            message += " Stopping (--stop_on_collapse); the checkpoints are kept."
        else:
            message += " --stop_on_collapse stops the run here."
        if self.verbose:
            print(message, flush=True)


class ReleaseFreeMemoryWhileCompiling(keras.callbacks.Callback):
    """Runs a `memory.FreeMemoryReleaser` from the start of each `fit` until its first batch ends
    (the call that traces, compiles and runs the first step)."""

    def __init__(self, interval: float = memory.TRIM_INTERVAL_SECONDS):
        super().__init__()
        self.releaser = memory.FreeMemoryReleaser(interval)

    def on_train_begin(self, logs=None):
        self.releaser.start()

    def on_train_batch_end(self, batch, logs=None):
        self.releaser.stop()

    def on_train_end(self, logs=None):
        self.releaser.stop()
