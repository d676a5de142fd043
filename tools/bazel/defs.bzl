"""Macros of //:BUILD (Bazel 4.2.3 Starlark; see DEVELOPERS.md, "Bazel")."""

PYTEST_RUNNER = "//tools/bazel:pytest_runner.py"

# Every test target depends on these (labels of the calling package, //).
TEST_DEPS = [":dino_keras", ":test_support"]

def dino_py_test(name, src, size = "medium", data = [], deps = [], tags = []):
    """A py_test running one pytest file through //tools/bazel:pytest_runner.py.

    Args:
      name: the file's path under tests/ with "/" -> "_" and no ".py"
        (tests/models/test_vit.py -> models_test_vit).
      src: the test file, e.g. "tests/models/test_vit.py".
      size: "medium", or "large" (with tags = ["slow"]) when the file uses
        @pytest.mark.slow; "small" for quick checks.
      data: files the test reads at run time (scripts it runs, README.md, ...).
      deps: libraries beyond :dino_keras and :test_support (e.g. ":benchmarks").
      tags: ["slow"] for @pytest.mark.slow files (scripts/bazel_test.sh skips them).
    """
    native.py_test(
        name = name,
        size = size,
        srcs = [src, PYTEST_RUNNER],
        args = ["$(rootpath %s)" % src],
        data = data,
        main = PYTEST_RUNNER,
        tags = tags,
        deps = TEST_DEPS + deps,
    )
