"""Initialisation as the reference's: every layer its own draw, all seeded from `--seed`."""

import itertools

import numpy as np
import pytest

from dino_keras.models.factory import build_backbone, build_student_and_teacher
from tests.helpers import tiny_config

PREFIX = 16  # values compared at the start of two tensors


def student_weights(**overrides):
    student, _ = build_student_and_teacher(tiny_config(**overrides))
    return {v.path: np.array(v) for v in student.weights}


def random_tensors(weights):
    """The tensors drawn at random (not the constant LayerNorm gains, biases and gains)."""
    return {path: w for path, w in weights.items() if np.unique(w).size > 1}


def shared_prefix_pairs(weights):
    flat = {path: w.ravel() for path, w in random_tensors(weights).items()}
    return [
        (a, b)
        for a, b in itertools.combinations(flat, 2)
        if np.allclose(flat[a][:PREFIX], flat[b][:PREFIX], atol=0, rtol=1e-6)
    ]


def test_no_two_student_tensors_share_values():
    weights = student_weights(seed=0, depth=3)
    # Every matrix of every block and of the head is random; LayerNorm and biases are not.
    assert len(random_tensors(weights)) == 4 + 4 * 3 + 3 + 1
    assert shared_prefix_pairs(weights) == []


def test_one_seed_builds_equal_networks_and_two_seeds_differ():
    first, again, other = student_weights(seed=5), student_weights(seed=5), student_weights(seed=6)
    assert first.keys() == again.keys() == other.keys()
    for path in first:
        np.testing.assert_array_equal(first[path], again[path], err_msg=path)
    differing = [p for p in random_tensors(first) if not np.array_equal(first[p], other[p])]
    assert sorted(differing) == sorted(random_tensors(first))


def test_student_and_teacher_start_equal():
    student, teacher = build_student_and_teacher(tiny_config(seed=1))
    for s, t in zip(student.weights, teacher.weights, strict=True):
        np.testing.assert_array_equal(np.array(s), np.array(t), err_msg=s.path)


def assert_std(values, expected, path):
    # The sample standard deviation's relative error is about 1 / sqrt(2n); allow 5 of them.
    tolerance = 5 / np.sqrt(2 * values.size)
    assert abs(values.std() / expected - 1) < tolerance, (path, values.std(), expected)
    assert abs(values.mean()) < 5 * expected / np.sqrt(values.size), (path, values.mean())


@pytest.mark.parametrize("seed", [0, 11])
def test_statistics_match_the_reference_init(seed):
    weights = student_weights(seed=seed, embed_dim=64, out_dim=512)
    checked = set()
    for path, w in weights.items():
        name = path.removeprefix("student/")
        if name.endswith(("cls_token", "pos_embed")) or (
            name.endswith("kernel") and ("blocks_" in name or "head/mlp_" in name)
        ):
            # Linear layers, cls and position tokens: trunc_normal_(std=0.02).
            assert_std(w, 0.02, path)
        elif name.endswith("bias") and "patch_embed" not in name:
            np.testing.assert_array_equal(w, 0.0, err_msg=path)
        elif name.endswith("gamma"):
            np.testing.assert_array_equal(w, 1.0, err_msg=path)
        elif name.endswith("beta"):
            np.testing.assert_array_equal(w, 0.0, err_msg=path)
        elif name.startswith("backbone/patch_embed"):
            # torch's Conv2d default: uniform(+-1/sqrt(fan_in)), kernel and bias.
            bound = (4 * 4 * 3) ** -0.5
            assert np.abs(w).max() <= bound, path
            if w.size > 1000:
                assert_std(w, bound / np.sqrt(3), path)
            else:
                assert np.abs(w).max() > 0.8 * bound, path
        elif name == "head/last_layer/kernel_v":
            # Made after the reference's init pass: torch's Linear default, uniform(+-1/sqrt(256)).
            bound = 256**-0.5
            assert np.abs(w).max() <= bound
            assert_std(w, bound / np.sqrt(3), path)
        elif name == "head/last_layer/gain":
            np.testing.assert_array_equal(w, 1.0)
        else:
            raise AssertionError(f"unchecked weight {path}")
        checked.add(name)
    assert "backbone/patch_embed/bias" in checked and "head/last_layer/kernel_v" in checked


def test_resnet_convolutions_are_seeded_and_independent():
    def conv_kernels(seed):
        backbone = build_backbone(
            tiny_config(arch="resnet50", seed=seed, global_crops_size=32, local_crops_size=32),
            drop_path_rate=0.0,
        )
        return {v.path: np.array(v) for v in backbone.weights if v.path.endswith("kernel")}

    first, again, other = conv_kernels(3), conv_kernels(3), conv_kernels(4)
    assert len(first) == 53
    assert shared_prefix_pairs(first) == []
    for path, kernel in first.items():
        np.testing.assert_array_equal(kernel, again[path], err_msg=path)
        assert not np.array_equal(kernel, other[path]), path
    # torchvision: kaiming_normal_(mode="fan_out"), std sqrt(2 / (out_channels * k * k)).
    stem = first["conv1/kernel"]
    assert_std(stem, np.sqrt(2 / (64 * 7 * 7)), "conv1")
