"""Checks that the top-level Bazel BUILD file has a target for every Python file.

Plain pytest, no Bazel needed. BUILD is Starlark, whose syntax is a subset of
Python's, so it is parsed with `ast` and its attributes are evaluated (string and
list literals, `+`, `%`, top-level constants and `glob()`). Macros loaded from a .bzl
file of the repository (`dino_py_test` of tools/bazel/defs.bzl) are expanded as that
file defines them: a macro whose body is one `native.<rule>(...)` call becomes that
rule's target. The check fails, naming the file, when

* a `dino_keras/**/*.py` file is not in the `srcs` of any `py_library`,
* a `scripts/*.py` file has no `py_binary` (with `main` = that file),
* a `tests/**/test_*.py` file has no `py_test` that runs it,
* a target names a file (in srcs, main, data or `$(rootpath ...)` args) that
  does not exist, or a `:label` that is not defined in BUILD,
* a test file using `pytest.mark.slow` has a target without `size = "large"`
  and `tags = ["slow"]`,
* a nested BUILD file would split the `//` package (breaking the globs above).

To print BUILD snippets for everything that is missing:

    .venv/bin/python tests/test_build_targets.py --print-missing
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import os
import re
import sys
from pathlib import Path

import pytest

# Not resolved: under `bazel test` this is the runfiles tree, whose files are
# the ones declared as data of this test (see //:test_build_targets).
REPO_ROOT = Path(__file__).absolute().parent.parent

PYTEST_RUNNER = "tools/bazel/pytest_runner.py"
PYTEST_RUNNER_LABEL = "//tools/bazel:pytest_runner.py"
LIBRARY_LABEL = ":dino_keras"
CONFIGS_LABEL = ":configs"
PACKAGE_DIRS = ("dino_keras", "scripts", "tests", "configs")
BUILD_FILE_NAMES = ("BUILD", "BUILD.bazel")

_MAKE_VAR = re.compile(r"\$\((?:rootpaths?|locations?|execpaths?)\s+([^)\s]+)\)")
_SKIP_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache"}
_IGNORED_CALLS = {"package", "exports_files", "licenses", "workspace"}
TEST_MACRO = "dino_py_test"


class Unsupported(Exception):
    """A BUILD expression this checker cannot evaluate statically."""


@dataclasses.dataclass
class Target:
    rule: str
    name: str
    attrs: dict
    lineno: int

    def strings(self, attr: str) -> list[str]:
        value = self.attrs.get(attr)
        if value is None:
            return []
        if isinstance(value, str):
            return [value]
        return [v for v in value if isinstance(v, str)]


def uses_slow_mark(path: Path) -> bool:
    """True if the test file applies `pytest.mark.slow` (decorator or `pytestmark`)."""
    try:
        tree = ast.parse(path.read_text(errors="replace"), filename=str(path))
    except SyntaxError:
        return False  # pytest will report it
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "slow":
            parent = node.value
            if isinstance(parent, ast.Attribute) and parent.attr == "mark":
                return True
            if isinstance(parent, ast.Name) and parent.id == "mark":
                return True
    return False


# --------------------------------------------------------------------------- #
# Starlark evaluation (the small subset BUILD files here use)
# --------------------------------------------------------------------------- #


def _glob_regex(pattern: str) -> re.Pattern:
    segments = pattern.split("/")
    regex = ""
    for i, segment in enumerate(segments):
        last = i == len(segments) - 1
        if segment == "**":
            regex += ".*" if last else "(?:[^/]+/)*"
            continue
        for char in segment:
            if char == "*":
                regex += "[^/]*"
            elif char == "?":
                regex += "[^/]"
            else:
                regex += re.escape(char)
        regex += "" if last else "/"
    return re.compile(regex + r"\Z")


def _walk_files(root: Path, top: str) -> list[str]:
    base = root / top if top else root
    if base.is_file():
        return [top]
    found = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        for filename in filenames:
            found.append(filename if rel_dir == "." else f"{rel_dir}/{filename}")
    return found


def glob_files(root: Path, include: list[str], exclude: list[str] = ()) -> list[str]:
    """Bazel-like glob: files (not directories) matching include minus exclude."""
    excludes = [_glob_regex(p) for p in exclude]
    matched = set()
    for pattern in include:
        literal = []
        for segment in pattern.split("/"):
            if any(c in segment for c in "*?["):
                break
            literal.append(segment)
        regex = _glob_regex(pattern)
        for rel in _walk_files(root, "/".join(literal)):
            if regex.match(rel) and not any(e.match(rel) for e in excludes):
                matched.add(rel)
    return sorted(matched)


def _evaluate(node: ast.AST, env: dict, root: Path):
    if isinstance(node, ast.Constant) and isinstance(node.value, (str, int, bool, type(None))):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_evaluate(e, env, root) for e in node.elts]
    if isinstance(node, ast.Dict):
        return {
            _evaluate(k, env, root): _evaluate(v, env, root)
            for k, v in zip(node.keys, node.values, strict=True)
        }
    if isinstance(node, ast.Name):
        if node.id in ("True", "False", "None"):
            return {"True": True, "False": False, "None": None}[node.id]
        if node.id in env:
            return env[node.id]
        raise Unsupported(f"unknown name {node.id!r}")
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _evaluate(node.left, env, root) + _evaluate(node.right, env, root)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod):
        left = _evaluate(node.left, env, root)
        if not isinstance(left, str):
            raise Unsupported(ast.unparse(node))
        return left % _evaluate(node.right, env, root)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "glob":
        args = [_evaluate(a, env, root) for a in node.args]
        kwargs = {kw.arg: _evaluate(kw.value, env, root) for kw in node.keywords}
        include = args[0] if args else kwargs.get("include", [])
        exclude = args[1] if len(args) > 1 else kwargs.get("exclude", [])
        return glob_files(root, include, exclude)
    raise Unsupported(ast.unparse(node))


@dataclasses.dataclass
class Macro:
    """A .bzl function whose body is one `native.<rule>(...)` call."""

    rule: str
    params: list[str]
    defaults: dict
    keywords: list[ast.keyword]
    env: dict  # the .bzl file's top-level constants
    where: str

    def expand(self, attrs: dict, root: Path) -> dict:
        unknown = sorted(set(attrs) - set(self.params))
        if unknown:
            raise Unsupported(f"{self.where} has no parameter {', '.join(unknown)}")
        missing = [p for p in self.params if p not in attrs and p not in self.defaults]
        if missing:
            raise Unsupported(f"{self.where} needs {', '.join(missing)}")
        local = {**self.env, **self.defaults, **attrs}
        return {kw.arg: _evaluate(kw.value, local, root) for kw in self.keywords}


def load_macros(root: Path, label: str, names: list[str]) -> tuple[dict[str, Macro], list[str]]:
    """The macros `names` of the .bzl file `label` (a file of this repository)."""
    rel = label_to_path(label)
    if rel is None or not (root / rel).is_file():
        return {}, [f"BUILD: load() of {label}: {rel} does not exist"]
    tree = ast.parse((root / rel).read_text(), filename=rel)
    env: dict = {}
    macros: dict[str, Macro] = {}
    problems: list[str] = []
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and all(isinstance(t, ast.Name) for t in stmt.targets):
            try:
                value = _evaluate(stmt.value, env, root)
            except Unsupported:
                continue
            for t in stmt.targets:
                env[t.id] = value
        elif isinstance(stmt, ast.FunctionDef) and stmt.name in names:
            calls = [
                s.value
                for s in stmt.body
                if isinstance(s, ast.Expr)
                and isinstance(s.value, ast.Call)
                and isinstance(s.value.func, ast.Attribute)
                and isinstance(s.value.func.value, ast.Name)
                and s.value.func.value.id == "native"
            ]
            where = f"{rel}:{stmt.lineno}: {stmt.name}"
            if len(calls) != 1:
                problems.append(f"{where}: expected one native.<rule>(...) call in its body")
                continue
            params = [a.arg for a in stmt.args.args]
            defaults = dict(
                zip(
                    params[len(params) - len(stmt.args.defaults) :],
                    [_evaluate(d, env, root) for d in stmt.args.defaults],
                    strict=True,
                )
            )
            macros[stmt.name] = Macro(
                calls[0].func.attr, params, defaults, calls[0].keywords, env, where
            )
    defined = {s.name for s in tree.body if isinstance(s, ast.FunctionDef)}
    for name in names:
        if name not in defined:
            problems.append(f"BUILD: load() of {label}: {rel} defines no macro {name!r}")
    return macros, problems


def parse_build(root: Path) -> tuple[list[Target], list[str]]:
    """Returns the rule calls of root/BUILD and the problems found while evaluating it."""
    build = root / "BUILD"
    if not build.is_file():
        return [], ["BUILD: the top-level BUILD file does not exist"]
    tree = ast.parse(build.read_text(), filename=str(build))
    env: dict = {}
    targets: list[Target] = []
    problems: list[str] = []
    macros: dict[str, Macro] = {}
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and all(isinstance(t, ast.Name) for t in stmt.targets):
            try:
                value = _evaluate(stmt.value, env, root)
            except Unsupported as err:
                problems.append(f"BUILD:{stmt.lineno}: cannot evaluate {err}")
                continue
            for t in stmt.targets:
                env[t.id] = value
        elif isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call):
            call = stmt.value
            if not isinstance(call.func, ast.Name) or call.func.id in _IGNORED_CALLS:
                continue
            if call.func.id == "load":
                try:
                    label, *names = [_evaluate(a, env, root) for a in call.args]
                except Unsupported as err:
                    problems.append(f"BUILD:{stmt.lineno}: cannot evaluate load() {err}")
                    continue
                loaded, load_problems = load_macros(root, label, names)
                macros.update(loaded)
                problems += load_problems
                continue
            attrs = {}
            for kw in call.keywords:
                if kw.arg is None:
                    problems.append(f"BUILD:{stmt.lineno}: **kwargs are not supported")
                    continue
                try:
                    attrs[kw.arg] = _evaluate(kw.value, env, root)
                except Unsupported as err:
                    problems.append(
                        f"BUILD:{stmt.lineno}: cannot evaluate {call.func.id}.{kw.arg} = {err}"
                        " (keep BUILD attributes to literals, +, constants and glob())"
                    )
            name = attrs.get("name")
            if not isinstance(name, str):
                problems.append(f"BUILD:{stmt.lineno}: {call.func.id}() without a literal name")
                continue
            rule = call.func.id
            if rule in macros:
                try:
                    attrs = macros[rule].expand(attrs, root)
                except Unsupported as err:
                    problems.append(f"BUILD:{stmt.lineno}: {rule}({name!r}): {err}")
                    continue
                rule = macros[rule].rule
            targets.append(Target(rule, name, attrs, stmt.lineno))
        elif not isinstance(stmt, ast.Expr):  # docstrings/comments are fine
            problems.append(f"BUILD:{stmt.lineno}: unsupported statement {type(stmt).__name__}")
    return targets, problems


# --------------------------------------------------------------------------- #
# The checks
# --------------------------------------------------------------------------- #


def label_to_path(label: str) -> str | None:
    """Maps a label of the main repository to a workspace-relative path."""
    if label.startswith("@"):
        return None
    if label.startswith("//"):
        package, _, name = label[2:].partition(":")
        if not name:
            name = package.rsplit("/", 1)[-1]
        return f"{package}/{name}" if package else name
    return label[1:] if label.startswith(":") else label


def _label_problem(root: Path, label: str, names: set[str], where: str) -> str | None:
    path = label_to_path(label)
    if path is None:
        return None
    if label.startswith("//") and label[2:].partition(":")[0]:
        package = label[2:].partition(":")[0]
        if (root / path).exists():
            return None
        if any((root / package / b).is_file() for b in BUILD_FILE_NAMES) and "." not in path:
            return None  # a rule target of another package; not checked here
        return f"{where} names {label}, but {path} does not exist"
    if path in names or (root / path).exists():
        return None
    if label.startswith(":"):
        return f"{where} names {label}, which is not a target in BUILD"
    return f"{where} names file {path}, which does not exist"


def target_name_for(rel: str) -> str:
    """Conventional target name: scripts/train.py -> train; tests/models/test_vit.py
    -> models_test_vit; tests/test_loss.py -> test_loss."""
    path = Path(rel)
    if path.parts[0] == "tests":
        return "_".join(path.with_suffix("").parts[1:])
    return path.stem


def snippet_for(root: Path, rel: str) -> str:
    """A BUILD target for rel following the conventions of //:BUILD."""
    if rel.startswith("scripts/"):
        return (
            "py_binary(\n"
            f'    name = "{target_name_for(rel)}",\n'
            f'    srcs = ["{rel}"],\n'
            f'    data = ["{CONFIGS_LABEL}"],\n'
            f'    main = "{rel}",\n'
            f'    deps = ["{LIBRARY_LABEL}"],\n'
            ")\n"
        )
    lines = [
        f"{TEST_MACRO}(",
        f'    name = "{target_name_for(rel)}",',
        f'    src = "{rel}",',
    ]
    if uses_slow_mark(root / rel):
        lines += ['    size = "large",', '    tags = ["slow"],']
    lines += [")", ""]
    return "\n".join(lines)


def check_build(root: Path) -> tuple[list[str], list[str]]:
    """Returns (problems, files that need a new target) for the tree at root."""
    targets, problems = parse_build(root)
    missing: list[str] = []
    names: dict[str, Target] = {}
    for target in targets:
        if target.name in names:
            problems.append(
                f"BUILD:{target.lineno}: target name {target.name!r} is already used on line "
                f"{names[target.name].lineno}"
            )
        names.setdefault(target.name, target)

    for directory in PACKAGE_DIRS:
        for build_name in BUILD_FILE_NAMES:
            for nested in glob_files(root, [f"{directory}/**/{build_name}"]):
                problems.append(
                    f"{nested}: nested BUILD file splits the // package and breaks its globs; "
                    "delete it and declare targets in the top-level BUILD"
                )

    # Every label / file a target names must exist.
    for target in targets:
        where = f"BUILD:{target.lineno}: {target.rule} {target.name!r}"
        labels = target.strings("srcs") + target.strings("data") + target.strings("deps")
        labels += target.strings("main")
        for arg in target.strings("args"):
            labels += _MAKE_VAR.findall(arg)
        for label in labels:
            problem = _label_problem(root, label, set(names), where)
            if problem:
                problems.append(problem)

    def files_of(target: Target, attr: str) -> set[str]:
        return {p for p in map(label_to_path, target.strings(attr)) if p}

    # 1. Library coverage.
    library_srcs = set()
    for target in targets:
        if target.rule == "py_library":
            library_srcs |= files_of(target, "srcs")
    for rel in glob_files(root, ["dino_keras/**/*.py"]):
        if rel not in library_srcs:
            problems.append(f"{rel}: not in the srcs of any py_library in BUILD")

    # 2. One py_binary per script.
    for rel in glob_files(root, ["scripts/*.py"], ["scripts/__init__.py"]):
        # main = rel, or (without main) srcs = [rel].
        binaries = [
            t
            for t in targets
            if t.rule == "py_binary" and (files_of(t, "main") or files_of(t, "srcs")) == {rel}
        ]
        if not binaries:
            problems.append(f"{rel}: no py_binary in BUILD (with main = {rel!r})")
            missing.append(rel)

    # 3. One py_test per test file, which must actually run it.
    test_files = glob_files(root, ["tests/**/test_*.py"])
    runs: dict[str, list[Target]] = {}
    for target in targets:
        if target.rule != "py_test":
            continue
        run = files_of(target, "main") & set(test_files)
        for arg in target.strings("args"):
            run |= {label_to_path(label) for label in _MAKE_VAR.findall(arg)}
        listed = files_of(target, "srcs") & set(test_files)
        for rel in sorted(listed - run):
            problems.append(
                f"BUILD:{target.lineno}: py_test {target.name!r} lists {rel} in srcs but does not "
                f'run it (use main = "{PYTEST_RUNNER_LABEL}", args = ["$(rootpath {rel})"])'
            )
        for rel in sorted(run & listed):
            runs.setdefault(rel, []).append(target)
        if PYTEST_RUNNER in files_of(target, "main") and not run & listed:
            problems.append(
                f"BUILD:{target.lineno}: py_test {target.name!r} runs the pytest runner but no "
                "test file from its srcs is passed in args"
            )
    for rel in test_files:
        owners = runs.get(rel, [])
        if not owners:
            problems.append(f"{rel}: no py_test in BUILD runs this file")
            missing.append(rel)
            continue
        if len(owners) > 1:
            problems.append(
                f"{rel}: run by several py_test targets: {', '.join(t.name for t in owners)}"
            )
        target = owners[0]
        if uses_slow_mark(root / rel):
            if target.attrs.get("size") != "large":
                problems.append(
                    f"{rel}: uses pytest.mark.slow, so py_test {target.name!r} needs "
                    f'size = "large" (has {target.attrs.get("size", "medium")!r})'
                )
            if "slow" not in target.strings("tags"):
                problems.append(
                    f"{rel}: uses pytest.mark.slow, so py_test {target.name!r} needs "
                    'tags = ["slow"]'
                )
    return problems, missing


# --------------------------------------------------------------------------- #
# Tests
# --------------------------------------------------------------------------- #


def _format(problems: list[str], missing: list[str], root: Path) -> str:
    text = "BUILD is out of date:\n" + "\n".join(f"  - {p}" for p in problems)
    if missing:
        text += "\n\nAdd to BUILD:\n\n" + "\n".join(snippet_for(root, rel) for rel in missing)
    return text


def test_build_covers_every_python_file():
    problems, missing = check_build(REPO_ROOT)
    assert not problems, _format(problems, missing, REPO_ROOT)


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


_FAKE_BUILD = """
load("//tools/bazel:defs.bzl", "dino_py_test")
py_library(name = "dino_keras", srcs = glob(["dino_keras/**/*.py"]), imports = ["."])
py_library(name = "test_support", srcs = glob(["tests/conftest.py"], allow_empty = True))
filegroup(name = "configs", srcs = glob(["configs/*.cfg"]))
RUNNER = "//tools/bazel:pytest_runner.py"
py_binary(
    name = "train",
    srcs = ["scripts/train.py"],
    main = "scripts/train.py",
    data = [":configs"],
    deps = [":dino_keras"],
)
py_test(
    name = "test_loss",
    srcs = ["tests/test_loss.py", RUNNER],
    main = RUNNER,
    args = ["$(rootpath tests/test_loss.py)"],
    deps = [":dino_keras", ":test_support"],
)
"""


MACRO_FILE = "tools/bazel/defs.bzl"


@pytest.fixture
def fake_tree(tmp_path: Path) -> Path:
    _write(
        tmp_path,
        {
            "BUILD": _FAKE_BUILD,
            "tools/bazel/pytest_runner.py": "",
            "tools/bazel/BUILD": "",
            MACRO_FILE: (REPO_ROOT / MACRO_FILE).read_text(),
            "dino_keras/__init__.py": "",
            "dino_keras/models/vit.py": "",
            "scripts/train.py": "",
            "configs/default.cfg": "",
            "tests/conftest.py": "",
            "tests/test_loss.py": "def test_x():\n    pass\n",
        },
    )
    return tmp_path


def test_fake_tree_is_complete(fake_tree: Path):
    assert check_build(fake_tree) == ([], [])


def test_reports_missing_py_test(fake_tree: Path):
    _write(fake_tree, {"tests/models/test_vit.py": "def test_vit():\n    pass\n"})
    problems, missing = check_build(fake_tree)
    assert problems == ["tests/models/test_vit.py: no py_test in BUILD runs this file"]
    assert missing == ["tests/models/test_vit.py"]
    snippet = snippet_for(fake_tree, "tests/models/test_vit.py")
    assert 'name = "models_test_vit"' in snippet
    assert snippet.startswith("dino_py_test(") and 'src = "tests/models/test_vit.py"' in snippet
    # The suggested snippet really fixes it.
    (fake_tree / "BUILD").write_text(_FAKE_BUILD + snippet)
    assert check_build(fake_tree) == ([], [])


def test_macro_expands_as_defs_bzl_defines_it(fake_tree: Path):
    build = (fake_tree / "BUILD").read_text()
    slow_test = "import pytest\n\n@pytest.mark.slow\ndef test_x():\n    pass\n"
    _write(fake_tree, {"tests/models/test_vit.py": slow_test})
    macro_call = (
        'dino_py_test(name = "models_test_vit", src = "tests/models/test_vit.py", '
        'size = "large", data = ["scripts/train.py"], deps = [":configs"], tags = ["slow"])\n'
    )
    (fake_tree / "BUILD").write_text(build + macro_call)
    assert check_build(fake_tree) == ([], [])
    targets, _ = parse_build(fake_tree)
    vit = next(t for t in targets if t.name == "models_test_vit")
    assert vit.rule == "py_test"
    assert vit.attrs == {
        "name": "models_test_vit",
        "size": "large",
        "srcs": ["tests/models/test_vit.py", PYTEST_RUNNER_LABEL],
        "args": ["$(rootpath tests/models/test_vit.py)"],
        "data": ["scripts/train.py"],
        "main": PYTEST_RUNNER_LABEL,
        "tags": ["slow"],
        "deps": [":dino_keras", ":test_support", ":configs"],
    }
    # The checks apply to the expanded target: a slow file needs size and tags.
    (fake_tree / "BUILD").write_text(build + macro_call.replace(', tags = ["slow"]', ""))
    assert check_build(fake_tree)[0] == [
        "tests/models/test_vit.py: uses pytest.mark.slow, so py_test 'models_test_vit' needs "
        'tags = ["slow"]'
    ]
    # A parameter the macro does not have, or a macro the .bzl file does not define.
    (fake_tree / "BUILD").write_text(build + macro_call.replace("size =", "timeout ="))
    assert any("has no parameter timeout" in p for p in check_build(fake_tree)[0])
    (fake_tree / "BUILD").write_text(build.replace('"dino_py_test")', '"other_test")'))
    assert any("defines no macro 'other_test'" in p for p in check_build(fake_tree)[0])


def test_reports_missing_py_binary(fake_tree: Path):
    _write(fake_tree, {"scripts/export.py": ""})
    problems, missing = check_build(fake_tree)
    assert problems == [
        "scripts/export.py: no py_binary in BUILD (with main = 'scripts/export.py')"
    ]
    assert missing == ["scripts/export.py"]
    (fake_tree / "BUILD").write_text(_FAKE_BUILD + snippet_for(fake_tree, "scripts/export.py"))
    assert check_build(fake_tree) == ([], [])


def test_reports_library_file_outside_srcs(fake_tree: Path):
    build = (fake_tree / "BUILD").read_text()
    explicit = 'srcs = ["dino_keras/__init__.py"]'
    (fake_tree / "BUILD").write_text(build.replace('srcs = glob(["dino_keras/**/*.py"])', explicit))
    problems, _ = check_build(fake_tree)
    assert problems == ["dino_keras/models/vit.py: not in the srcs of any py_library in BUILD"]


def test_reports_targets_naming_missing_files(fake_tree: Path):
    (fake_tree / "tests/test_loss.py").unlink()
    (fake_tree / "scripts/train.py").unlink()
    problems, _ = check_build(fake_tree)
    assert any("names file tests/test_loss.py, which does not exist" in p for p in problems)
    assert any("names file scripts/train.py, which does not exist" in p for p in problems)
    build = (fake_tree / "BUILD").read_text().replace('":test_support"', '":missing_lib"')
    (fake_tree / "BUILD").write_text(build)
    problems, _ = check_build(fake_tree)
    assert any("names :missing_lib, which is not a target in BUILD" in p for p in problems)


def test_reports_slow_test_without_tags(fake_tree: Path):
    _write(
        fake_tree,
        {"tests/test_loss.py": "import pytest\n\n@pytest.mark.slow\ndef test_x():\n    pass\n"},
    )
    problems, _ = check_build(fake_tree)
    assert problems == [
        "tests/test_loss.py: uses pytest.mark.slow, so py_test 'test_loss' needs "
        "size = \"large\" (has 'medium')",
        "tests/test_loss.py: uses pytest.mark.slow, so py_test 'test_loss' needs tags = [\"slow\"]",
    ]


def test_reports_test_listed_but_not_run(fake_tree: Path):
    build = _FAKE_BUILD.replace('args = ["$(rootpath tests/test_loss.py)"],', "")
    (fake_tree / "BUILD").write_text(build)
    problems, missing = check_build(fake_tree)
    assert "tests/test_loss.py: no py_test in BUILD runs this file" in problems
    assert any("lists tests/test_loss.py in srcs but does not run it" in p for p in problems)
    assert missing == ["tests/test_loss.py"]


def test_reports_nested_build_file(fake_tree: Path):
    _write(fake_tree, {"dino_keras/models/BUILD": ""})
    problems, _ = check_build(fake_tree)
    assert problems == [
        "dino_keras/models/BUILD: nested BUILD file splits the // package and breaks its globs; "
        "delete it and declare targets in the top-level BUILD"
    ]


def test_glob_semantics(fake_tree: Path):
    assert glob_files(fake_tree, ["dino_keras/**/*.py"]) == [
        "dino_keras/__init__.py",
        "dino_keras/models/vit.py",
    ]
    assert glob_files(fake_tree, ["dino_keras/*.py"]) == ["dino_keras/__init__.py"]
    assert glob_files(fake_tree, ["**/*.cfg"], ["configs/**"]) == []
    assert glob_files(fake_tree, ["tests/**/test_*.py"]) == ["tests/test_loss.py"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=REPO_ROOT)
    parser.add_argument(
        "--print-missing", action="store_true", help="print only BUILD snippets of missing targets"
    )
    args = parser.parse_args(argv)
    problems, missing = check_build(args.root)
    if args.print_missing:
        print("\n".join(snippet_for(args.root, rel) for rel in missing), end="")
        return 0
    if problems:
        print(_format(problems, missing, args.root))
        return 1
    print("BUILD covers every Python file.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
