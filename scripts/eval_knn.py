"""Weighted k-NN evaluation of a run's teacher (or an exported SavedModel) on labelled images.

    python scripts/eval_knn.py --checkpoint=runs/dino [--data_path=fashion_mnist]
        [--nb_knn=10,20,100,200] [--temperature=0.07] [--features_cache=DIR]
    python scripts/eval_knn.py --saved_model=exports/dino [...]

Features: the CLS embedding, L2-normalised, of the train split of --data_path (the bank) and
of the test split of --eval_data_path (default: --data_path), after the reference's evaluation
transform. Prints top-1 and top-5 per k. With --features_cache the features are stored as .npz
files there and reused while the model, data and image size are the same.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402


def define_flags(flag_values) -> None:
    from dino_keras.run_loading import define_eval_data_flags

    def string(name, default, help_text):
        flags.DEFINE_string(name, default, help_text, flag_values=flag_values)

    def integer(name, default, help_text):
        flags.DEFINE_integer(name, default, help_text, flag_values=flag_values)

    string("checkpoint", "", "Run directory, its checkpoints directory or a checkpoint prefix.")
    string(
        "saved_model",
        "",
        "An export of scripts/export.py (base or version directory), instead of --checkpoint.",
    )
    flags.DEFINE_enum(
        "which",
        "teacher",
        ["teacher", "student"],
        "Network of --checkpoint.",
        flag_values=flag_values,
    )
    define_eval_data_flags(
        flag_values,
        "Labelled images with a train split (the k-NN bank); "
        "same forms as scripts/train.py's --data_path.",
    )
    flags.DEFINE_list(
        "nb_knn", ["10", "20", "100", "200"], "Numbers of neighbours.", flag_values=flag_values
    )
    flags.DEFINE_float(
        "temperature", 0.07, "Temperature of the exp(similarity / T) vote.", flag_values=flag_values
    )
    integer(
        "image_size",
        0,
        "Centre-crop size; 0: the model's (the run's --global_crops_size "
        "or the export's image_size).",
    )
    integer("batch_size", 256, "Batch size of feature extraction.")
    string("features_cache", "", "Directory for cached features (.npz); reused when present.")
    string("output_json", "", "Also write the results to this JSON file.")


class UsageError(ValueError):
    pass


def _cache_path(cache_dir: str, description: dict, split: str) -> str:
    from dino_keras import run_dir

    digest = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]
    return run_dir.join(cache_dir, f"knn-features-{split}-{digest}.npz")


def _features(extract, dataset_fn, cache_dir: str, description: dict, split: str):
    import numpy as np

    from dino_keras import run_dir

    path = _cache_path(cache_dir, description, split) if cache_dir else ""
    if path and run_dir.is_file(path):
        with np.load(io.BytesIO(run_dir.read_bytes(path))) as cached:
            if json.loads(str(cached["description"])) == description:
                print(f"Using cached {split} features from {path}")
                return cached["features"], cached["labels"]
    features, labels = extract(dataset_fn())
    if path:
        encoded = io.BytesIO()
        np.savez(
            encoded,
            features=features,
            labels=labels,
            description=json.dumps(description, sort_keys=True),
        )
        run_dir.write_atomically(path, encoded.getvalue())
        print(f"Cached {split} features in {path}")
    return features, labels


def run(flag_values) -> dict:
    from dino_keras import run_dir
    from dino_keras.data.multicrop import build_eval_dataset
    from dino_keras.evaluation.knn import extract_features, extract_pixels, weighted_knn
    from dino_keras.run_loading import resolve_eval_sources

    if bool(flag_values.checkpoint) == bool(flag_values.saved_model):
        raise UsageError("pass exactly one of --checkpoint and --saved_model")
    try:
        ks = [int(k) for k in flag_values.nb_knn]
    except ValueError:
        raise UsageError(f"--nb_knn takes integers, got {','.join(flag_values.nb_knn)}") from None
    if not ks or min(ks) <= 0:
        raise UsageError(f"--nb_knn values must be positive, got {ks}")
    if flag_values.temperature <= 0:
        raise UsageError(f"--temperature must be positive, got {flag_values.temperature}")

    if flag_values.checkpoint:
        from dino_keras.run_loading import load_backbone

        loaded = load_backbone(flag_values.checkpoint, which=flag_values.which)
        image_size = flag_values.image_size or loaded.config.global_crops_size
        model = {"checkpoint": run_dir.absolute(loaded.checkpoint_path), "which": loaded.which}
        model_mtime = run_dir.modification_time(loaded.checkpoint_path + ".index")

        def extract(dataset):
            return extract_features(loaded.backbone, dataset)
    else:
        from dino_keras.export import exported_features, load_export

        exported, metadata, directory = load_export(flag_values.saved_model)
        image_size = flag_values.image_size or metadata.get("image_size")
        if not image_size:
            raise UsageError(f"{directory} records no image_size; pass --image_size")
        model = {"saved_model": run_dir.absolute(directory)}
        model_mtime = run_dir.modification_time(run_dir.join(directory, "saved_model.pb"))

        def extract(dataset):
            return exported_features(exported, dataset)

    train, test = resolve_eval_sources(
        flag_values.data_path,
        flag_values.eval_data_path,
        tfds_data_dir=flag_values.tfds_data_dir,
        limit_images=flag_values.limit_images,
        limit_test=flag_values.limit_test,
    )
    results = {
        "model": model,
        "image_size": image_size,
        "temperature": flag_values.temperature,
        "train_data": train.name,
        "test_data": test.name,
        "knn": {},
        "knn_pixels": {},
    }
    features = {}
    for split, source in (("train", train), ("test", test)):
        description = {
            **model,
            "model_mtime": model_mtime,
            "data": source.name,
            "num_examples": source.num_examples,
            "image_size": image_size,
        }
        features[split] = _features(
            extract,
            lambda source=source: build_eval_dataset(
                source, image_size=image_size, batch_size=flag_values.batch_size
            ),
            flag_values.features_cache,
            description,
            split,
        )
    num_classes = max(train.num_classes, test.num_classes)
    print(
        f"k-NN on {len(features['test'][1])} test images with a bank of "
        f"{len(features['train'][1])} ({image_size} px, T={flag_values.temperature})"
    )
    # The same k-NN on the images' own pixels: what the features add over them.
    pixels = {
        split: extract_pixels(
            build_eval_dataset(source, image_size=image_size, batch_size=flag_values.batch_size)
        )
        for split, source in (("train", train), ("test", test))
    }
    for k in ks:
        knn = dict(k=k, temperature=flag_values.temperature, num_classes=num_classes)
        result = weighted_knn(*features["train"], *features["test"], **knn)
        baseline = weighted_knn(*pixels["train"], *pixels["test"], **knn)
        results["knn"][str(k)] = result
        results["knn_pixels"][str(k)] = baseline
        print(
            f"{k}-NN: top-1 {result['top1']:.2f}%, top-5 {result['top5']:.2f}% "
            f"(raw pixels: top-1 {baseline['top1']:.2f}%, top-5 {baseline['top5']:.2f}%)"
        )
    if flag_values.output_json:
        run_dir.write_json(flag_values.output_json, results)
    return results


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from dino_keras.data.sources import DataSourceError
    from dino_keras.export import ExportError
    from dino_keras.run_loading import RunLoadingError

    try:
        run(flags.FLAGS)
    except (UsageError, DataSourceError, ExportError, RunLoadingError) as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    define_flags(flags.FLAGS)
    app.run(main)
