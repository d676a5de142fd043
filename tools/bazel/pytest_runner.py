"""Entry point of every py_test in //:BUILD: runs one pytest file under Bazel.

Usage (from BUILD, through the `dino_py_test` macro of //tools/bazel:defs.bzl):
py_test(main = "//tools/bazel:pytest_runner.py", args = ["$(rootpath tests/x/test_y.py)"],
...). Extra arguments after the file
are passed to pytest, e.g. `bazel test //:test_y --test_arg=-k --test_arg=foo`.
"""

import os
import sys

import pytest


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: pytest_runner.py TEST_FILE [PYTEST_ARGS...]", file=sys.stderr)
        return 2
    args = [
        argv[0],
        "-p",
        "no:cacheprovider",  # no .pytest_cache written into the runfiles tree
        "-o",
        "console_output_style=classic",
    ]
    xml_output = os.environ.get("XML_OUTPUT_FILE")
    if xml_output:  # per-test-case results in Bazel's test.xml
        args.append(f"--junitxml={xml_output}")
    exit_code = int(pytest.main(args + argv[1:]))
    if exit_code == pytest.ExitCode.NO_TESTS_COLLECTED:
        print(f"pytest_runner: no tests collected from {argv[0]}", file=sys.stderr)
    return exit_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
