"""Safety lint: every weights load in the repository is a safe one, and nothing downloads.

    python3 tests/lint_safety.py [FOLDER]     # default: the repository; exit 1 with the findings

Run by CI before the tests. What it refuses: torch.load without weights_only=True (tests must say
weights_only explicitly: they may read back, unrestricted, a file they wrote themselves), any other
weights_only than True outside tests, np.load(allow_pickle=True), pickle / joblib / dill loads, download
calls, and torch.hub.load of a non-local source. The one allowed exception is checkpoints.py's restricted
unpickler (torch.load(..., pickle_module=restricted_pickle, weights_only=False)), whose allow-list is
tested in tests/test_checkpoints.py.
"""

import ast
import os
import sys
from typing import List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What may load a pickle: torch.load with weights_only=True only. Nothing may download.
FORBIDDEN_CALLS = {
    "pickle.load",
    "cPickle.load",
    "dill.load",
    "dill.loads",
    "joblib.load",
    "torch.hub.load_state_dict_from_url",
    "torch.hub.download_url_to_file",
    "urllib.request.urlopen",
    "urllib.request.urlretrieve",
    "urlopen",
    "urlretrieve",
    "load_state_dict_from_url",
    "download_url_to_file",
}
FORBIDDEN_OUTSIDE_TESTS = {"pickle.loads", "requests.get", "requests.post", "eval", "exec"}


def _dotted(node) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return _dotted(node.value) + "." + node.attr
    return ""


def unsafe_loads(source: str, *, is_test: bool) -> List[str]:
    """The unsafe calls of a Python source: torch.load without weights_only=True (in tests: without an
    explicit weights_only), weights_only=False, np.load(allow_pickle=True), pickle and download calls,
    torch.hub.load of a non-local source."""
    problems = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        kwargs = {k.arg: k.value for k in node.keywords if k.arg}

        def const(key, kwargs=kwargs):
            return getattr(kwargs.get(key), "value", None)

        where = f"line {node.lineno}: {name}"
        # The one exception: checkpoints.py's restricted unpickler (torch < 2.6), whose allow-list is tested
        # in test_checkpoints.py; torch.load needs weights_only=False beside a pickle_module.
        restricted = _dotted(kwargs.get("pickle_module")) == "restricted_pickle" and const("weights_only") is False
        if name in ("torch.load", "torch.serialization.load"):
            # Tests may read back, unrestricted, a file they wrote themselves (test_network checks that the
            # public release's plain torch.load reads ours), but must say so explicitly.
            if is_test and "weights_only" not in kwargs:
                problems.append(f"{where} without an explicit weights_only")
            if not is_test and const("weights_only") is not True and not restricted:
                problems.append(f"{where} without weights_only=True")
        elif not is_test and "weights_only" in kwargs and const("weights_only") is not True:
            problems.append(f"{where} with weights_only other than True")
        if name.endswith("load") and const("allow_pickle") is True:
            problems.append(f"{where} with allow_pickle=True")
        if name == "torch.hub.load" and const("source") != "local":
            problems.append(f"{where} without source='local'")
        if name in FORBIDDEN_CALLS or (not is_test and name in FORBIDDEN_OUTSIDE_TESTS):
            problems.append(where)
    return problems


def python_files(folder: str) -> List[str]:
    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in ("__pycache__", "node_modules"))
        files += [os.path.join(root, n) for n in sorted(names) if n.endswith(".py")]
    return files


def main(argv: List[str]) -> int:
    folder = os.path.abspath(argv[0]) if argv else ROOT
    files = python_files(folder)
    problems = []
    for path in files:
        rel = os.path.relpath(path, folder)
        with open(path, encoding="utf-8") as f:
            problems += [f"{rel} {p}" for p in unsafe_loads(f.read(), is_test=rel.split(os.sep)[0] == "tests")]
    for problem in problems:
        print(problem)
    if problems:
        print(f"lint_safety: {len(problems)} unsafe load(s) in {folder}")
        return 1
    print(f"lint_safety: {len(files)} Python files, no unsafe load")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
