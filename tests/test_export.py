"""SavedModel export: TF Serving layout, signatures, equality with the Keras model in a fresh
interpreter that cannot import dino_keras, the REST b64 request format, bad input."""

import base64
import io
import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from dino_keras.data import augment
from dino_keras.export import (
    ExportError,
    export_run,
    load_export,
    resolve_saved_model_dir,
)
from dino_keras.run_loading import load_backbone
from tests.helpers import make_tiny_run

IMAGE_SIZE = 28  # the tiny run's global crop size; eval resize: shorter side to 32


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    make_tiny_run(run_dir)
    export_dir = tmp_path_factory.mktemp("export") / "dino"
    path = export_run(str(run_dir), str(export_dir), command="export.py --test")
    return run_dir, export_dir, path, load_backbone(str(run_dir)).backbone


def encode(array, image_format):
    buffer = io.BytesIO()
    Image.fromarray(array).save(
        buffer, image_format, **({"quality": 95} if image_format == "JPEG" else {})
    )
    return buffer.getvalue()


def rest_request(encoded_images):
    """A TF Serving REST predict body in the row ("instances") format with binary values."""
    return json.dumps(
        {
            "signature_name": "serve_image_bytes",
            "instances": [{"b64": base64.b64encode(e).decode("ascii")} for e in encoded_images],
        }
    )


# Decodes a REST body as TF Serving does: each {"b64": ...} value becomes the raw bytes of one
# element of the (only) string input. Used in-process and in the fresh interpreter.
DECODE_REST = textwrap.dedent("""
    def decode_rest_instances(body):
        import base64, json
        values = []
        for instance in json.loads(body)["instances"]:
            if isinstance(instance, dict) and set(instance) != {"b64"}:
                (instance,) = instance.values()  # named-input form {"image_bytes": {"b64": ...}}
            values.append(base64.b64decode(instance["b64"]))
        return values
""")
namespace: dict = {}
exec(DECODE_REST, namespace)
decode_rest_instances = namespace["decode_rest_instances"]


def test_layout_and_metadata(exported):
    run_dir, export_dir, path, _ = exported
    assert path == str(export_dir / "1")
    assert sorted(os.listdir(export_dir)) == ["1"]  # no staging directory left behind
    for name in ("saved_model.pb", "variables", "assets.extra/dino_export.json"):
        assert os.path.exists(os.path.join(path, name)), name
    with open(os.path.join(path, "assets.extra", "dino_export.json")) as f:
        metadata = json.load(f)
    assert metadata["architecture"] == {
        "is_vit": True,
        "num_features": 32,
        "arch": "vit_tiny",
        "patch_size": 4,
        "embed_dim": 32,
        "depth": 2,
        "num_heads": 2,
        "native_image_size": 28,
    }
    assert metadata["image_size"] == IMAGE_SIZE and metadata["which"] == "teacher"
    assert metadata["source_checkpoint"] == str(run_dir / "checkpoints" / "latest-1")
    assert metadata["command"] == "export.py --test"
    assert metadata["normalization"]["mean"] == list(augment.IMAGENET_MEAN)
    assert set(metadata["signatures"]) == {"serving_default", "serve_image_bytes"}
    assert "32" in metadata["signatures"]["serve_image_bytes"]["preprocessing"]["resize"]
    assert resolve_saved_model_dir(str(export_dir)) == path


def test_existing_version_is_not_overwritten(exported):
    run_dir, export_dir, path, _ = exported
    before = os.path.getmtime(os.path.join(path, "saved_model.pb"))
    with pytest.raises(ExportError, match="already exists"):
        export_run(str(run_dir), str(export_dir), version=1)
    assert os.path.getmtime(os.path.join(path, "saved_model.pb")) == before
    assert sorted(os.listdir(export_dir)) == ["1"]
    with pytest.raises(ExportError, match="positive"):
        export_run(str(run_dir), str(export_dir), version=0)


def test_overwrite_version_replaces_it(exported, tmp_path):
    run_dir = exported[0]
    export_dir = tmp_path / "export"
    first = export_run(str(run_dir), str(export_dir), version=2, which="student")
    second = export_run(str(run_dir), str(export_dir), version=2, overwrite=True)
    assert first == second and sorted(os.listdir(export_dir)) == ["2"]
    _, metadata, _ = load_export(str(export_dir))
    assert metadata["which"] == "teacher"


def keras_outputs(backbone, pixels):
    """The in-process Keras model's outputs for 0..255 images already of the model's size."""
    images = augment.normalize(tf.constant(pixels, tf.float32) / 255.0)
    tokens = backbone.forward_features(images).numpy()
    attention = backbone.get_last_selfattention(images).numpy()
    return {
        "embedding": backbone(images).numpy(),
        "patch_tokens": tokens[:, 1:],
        "attention": attention[:, :, 0, 1:],
    }


def reference_eval_crop(image):
    """The reference's evaluation transform, spelled out for a 28 px model: shorter side to
    round(28 * 256 / 224) = 32 (bicubic), the longer one int(32 * long / short), centre crop."""
    height, width = image.shape[:2]
    short = min(height, width)
    size = (32, int(32 * width / height)) if height == short else (int(32 * height / width), 32)
    resized = tf.image.resize(image.astype(np.float32), size, "bicubic", antialias=True).numpy()
    top, left = round((size[0] - 28) / 2), round((size[1] - 28) / 2)
    return np.clip(resized[top : top + 28, left : left + 28], 0, 255)


INPUTS = {  # serving_default cases: square, non-square, and sides that are not patch multiples
    "square": (2, 28, 28),
    "wide": (1, 28, 40),
    "odd": (2, 30, 41),  # resized in the graph to 32 x 40
}

FRESH_INTERPRETER = (
    textwrap.dedent("""
    import importlib.util, json, os, sys
    # This venv has dino_keras installed in editable mode (a meta-path finder from a .pth file);
    # remove it and every sys.path entry holding the package, then prove it is unimportable.
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
    sys.path_hooks[:] = [h for h in sys.path_hooks if "editable" not in repr(h).lower()]
    sys.path[:] = [p for p in sys.path if "__editable__" not in p
                   and not os.path.isdir(os.path.join(p or os.curdir, "dino_keras"))]
    sys.path_importer_cache.clear()
    assert importlib.util.find_spec("dino_keras") is None, "dino_keras is still importable"
    try:
        import dino_keras  # noqa: F401
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit("import dino_keras succeeded")

    import numpy as np
    import tensorflow as tf
    """)
    + DECODE_REST
    + textwrap.dedent("""
    export_dir, inputs_path, request_path, outputs_path = sys.argv[1:]
    loaded = tf.saved_model.load(export_dir)
    results = {}
    with np.load(inputs_path) as inputs:
        for case in inputs.files:
            out = loaded.signatures["serving_default"](images=tf.constant(inputs[case]))
            results.update({f"{case}/{key}": value.numpy() for key, value in out.items()})
    with open(request_path) as f:
        request = f.read()
    out = loaded.signatures["serve_image_bytes"](
        image_bytes=tf.constant(decode_rest_instances(request)))
    results.update({f"bytes/{key}": value.numpy() for key, value in out.items()})
    assert "dino_keras" not in sys.modules and importlib.util.find_spec("dino_keras") is None
    np.savez(outputs_path, **results)
    print("ok", sorted(results))
""")
)


def test_fresh_interpreter_without_dino_keras_matches_keras(exported, tmp_path):
    _, _, version_dir, backbone = exported
    rng = np.random.default_rng(0)
    inputs = {
        case: rng.uniform(0, 255, (b, h, w, 3)).astype(np.float32)
        for case, (b, h, w) in INPUTS.items()
    }
    np.savez(tmp_path / "inputs.npz", **inputs)
    png_image = rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)
    jpeg_image = rng.integers(0, 256, (36, 50, 3), dtype=np.uint8)
    encoded = [encode(png_image, "PNG"), encode(jpeg_image, "JPEG")]
    (tmp_path / "request.json").write_text(rest_request(encoded))

    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    result = subprocess.run(
        [
            sys.executable,
            "-I",
            "-c",
            FRESH_INTERPRETER,
            version_dir,
            str(tmp_path / "inputs.npz"),
            str(tmp_path / "request.json"),
            str(tmp_path / "outputs.npz"),
        ],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    with np.load(tmp_path / "outputs.npz") as served:
        served = dict(served)
    for case, pixels in inputs.items():
        if case == "odd":
            pixels = np.clip(tf.image.resize(pixels, (32, 40), "bicubic", antialias=True), 0, 255)
        for key, value in keras_outputs(backbone, pixels).items():
            assert served[f"{case}/{key}"].shape == value.shape, (case, key)
            np.testing.assert_allclose(
                served[f"{case}/{key}"], value, rtol=0, atol=1e-5, err_msg=f"{case}/{key}"
            )
    assert served["odd/attention"].shape == (2, 2, 8 * 10)
    # serve_image_bytes: the JPEG is decoded by the same libjpeg as in the graph.
    decoded = [png_image, tf.io.decode_jpeg(encoded[1]).numpy()]
    crops = np.stack([reference_eval_crop(image) for image in decoded])
    for key, value in keras_outputs(backbone, crops).items():
        np.testing.assert_allclose(
            served[f"bytes/{key}"], value, rtol=0, atol=1e-5, err_msg=f"bytes/{key}"
        )


def test_rest_b64_request_is_accepted_in_process(exported):
    _, export_dir, _, backbone = exported
    loaded, metadata, _ = load_export(str(export_dir))
    image = np.random.default_rng(3).integers(0, 256, (40, 33, 3), dtype=np.uint8)
    body = rest_request([encode(image, "PNG")] * 3)
    first_b64 = json.loads(body)["instances"][0]["b64"]
    named = json.dumps({"instances": [{"image_bytes": {"b64": first_b64}}]})
    for request, batch in ((body, 3), (named, 1)):
        out = loaded.signatures["serve_image_bytes"](
            image_bytes=tf.constant(decode_rest_instances(request))
        )
        assert out["embedding"].shape == (batch, 32)
        assert out["patch_tokens"].shape == (batch, 49, 32)
        assert out["attention"].shape == (batch, 2, 49)
        expected = keras_outputs(backbone, reference_eval_crop(image)[None])["embedding"]
        np.testing.assert_allclose(out["embedding"].numpy()[:1], expected, atol=1e-5)


def test_saved_model_cli_lists_both_signatures(exported):
    path = exported[2]
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    assert os.path.exists(cli), f"{cli} is missing (tensorflow's console script)"
    result = subprocess.run(
        [cli, "show", "--all", "--dir", path],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    blocks = dict(
        re.findall(r"signature_def\['(\w+)'\]:(.*?)(?=signature_def\[|\Z)", result.stdout, re.S)
    )
    assert {"serving_default", "serve_image_bytes"} <= set(blocks)

    def tensors(block):
        return dict(
            re.findall(r"\w+\['(\w+)'\] tensor_info:\s+dtype: \w+\s+shape: (\([^)]*\))", block)
        )

    assert tensors(blocks["serving_default"]) == {
        "images": "(-1, -1, -1, 3)",
        "embedding": "(-1, 32)",
        "patch_tokens": "(-1, -1, 32)",
        "attention": "(-1, 2, -1)",
    }
    assert tensors(blocks["serve_image_bytes"]) == {
        "image_bytes": "(-1)",
        "embedding": "(-1, 32)",
        "patch_tokens": "(-1, 49, 32)",
        "attention": "(-1, 2, 49)",
    }
    assert "DT_STRING" in blocks["serve_image_bytes"]


def test_bad_input_gives_clear_errors(exported, tmp_path):
    export_dir = exported[1]
    loaded, _, _ = load_export(str(export_dir / "1"))
    with pytest.raises(tf.errors.InvalidArgumentError, match="image"):
        loaded.signatures["serve_image_bytes"](
            image_bytes=tf.constant([b"\xff\xd8\xff\xe0 not a jpeg"])
        )
    with pytest.raises(ExportError, match="does not exist") as error:
        load_export(str(tmp_path / "missing_export"))
    assert "missing_export" in str(error.value)
    (tmp_path / "empty" / "1").mkdir(parents=True)
    with pytest.raises(ExportError, match="no saved_model.pb"):
        load_export(str(tmp_path / "empty"))
