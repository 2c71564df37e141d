"""Mutation testing of the named modules with the tests that cover them (mutmut), for
``./dev.sh mutate PATH...``: a habit for what you change, not a CI gate.

    ./dev.sh mutate lib_vaebatch/heap.py lib_vaebatch/cache/
    ./dev.sh mutate lib_vaebatch/tiling/spill.py --tests tests/tiling/test_spill.py
    ./dev.sh mutate --report            # the last run's counts per module, and its survivors

How it runs:

* The work happens in ``.mutmut/<paths>/`` (git-ignored; one folder per set of paths): links to
  the package and the tests, a copy of pyproject.toml, and mutmut's own configuration written for
  this run. mutmut copies the code into its ``mutants/`` and keeps its results there; a second run
  of the same paths tests again the mutants not killed before (the tests may have changed) and
  those whose function changed.
* The tests: each path's entry in :data:`COVERING` (``--tests`` replaces them). mutmut then runs,
  for each mutant, only the tests that called the mutated function, fastest first, stopping at the
  first failure.
* mutmut learns which test calls which function by tracing the test process only. Tests that run
  the product in a child process (real memory limits, real allocator settings, a killed run) are
  invisible to that trace; :data:`CHILD_PROCESS_TESTS` names them and the modules their children
  run, and they are added to those functions' tests after the trace.
* torch's thread pool does not survive ``fork``: mutmut forks one worker per mutant from a warm
  server, so torch runs one thread there (``OMP_NUM_THREADS=1``; two mutants run at a time).

The counts (killed, survived, no tests, timeout) per module are printed and written to the
workspace's ``summary.json``; ``--report`` prints every workspace's counts and survivors.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE = ROOT / ".mutmut"
#: This run's workspace (one per set of paths: mutmut's trace and results are per workspace).
WORK = BASE

#: Where each part of the package is tested (a path prefix: the tests to give mutmut).
COVERING: dict[str, list[str]] = {
    "lib_vaebatch/tiling/": ["tests/tiling", "tests/engine/test_tiled_engine.py"],
    "lib_vaebatch/heap.py": ["tests/engine/test_heap.py", "tests/tiling/test_trim.py"],
    "lib_vaebatch/cache/": ["tests/cache"],
    "lib_vaebatch/forge/": ["tests/forge"],
    "lib_vaebatch/webui/": ["tests/webui"],
    "lib_vaebatch/engine/": ["tests/engine"],
    "lib_vaebatch/backends/": ["tests/backends", "tests/api/test_remote.py"],
    "lib_vaebatch/api/": ["tests/api", "tests/hardening"],
    "lib_vaebatch/ui/": ["tests/ui"],
    "lib_vaebatch/comfy/": ["tests/comfy", "tests/test_comfy_pack.py"],
}

#: Tests whose product code runs in a child process (a test id prefix), and the functions (globs
#: of mutmut's names, ``module.x_function`` / ``module.xǁClassǁmethod``) that child runs.
CHILD_PROCESS_TESTS: dict[str, list[str]] = {
    # real memory limits: what they show beyond the in-process tests is where the store keeps the
    # values it is given (two minutes a mutant: only for the store's own two methods)
    "tests/tiling/test_memory_limit.py": ["lib_vaebatch.tiling.spill.xǁSpillStoreǁ*"],
    "tests/tiling/test_spill.py::test_a_spill_store_that_cannot_be_written": ["lib_vaebatch.tiling.spill.*"],
    "tests/engine/test_heap.py": ["lib_vaebatch.heap.*"],
    "tests/cache/test_run.py": ["lib_vaebatch.cache.*"],
}

#: The suite's slowest tests, left out of mutation runs (minutes per mutant for what faster tests
#: of the same code already check); run them with ``--tests``.
SKIP = ["tests/tiling/test_fast.py::test_fast_decode_of_structured_latents_is_above_40_db"]


def covering(paths: list[str]) -> list[str]:
    tests: list[str] = []
    for path in paths:
        found = [t for prefix, ts in COVERING.items() if path.startswith(prefix) for t in ts]
        if not found:
            stem = Path(path).stem
            own = ROOT / "tests" / f"test_{stem}.py"
            found = [own.relative_to(ROOT).as_posix()] if own.exists() else ["tests"]
        tests += [t for t in found if t not in tests]
    return tests


def _globs(paths: list[str]) -> list[str]:
    out = []
    for path in paths:
        p = ROOT / path
        if not p.exists():
            raise SystemExit(f"mutate: {path}: no such file or folder")
        out.append(f"{path.rstrip('/')}/*" if p.is_dir() else path)
    return out


def _config(paths: list[str], tests: list[str]) -> str:
    lines = ["[mutmut]", "source_paths=lib_vaebatch", "only_mutate="]
    lines += [f"    {g}" for g in _globs(paths)]
    lines += ["pytest_add_cli_args_test_selection="] + [f"    {t}" for t in tests]
    lines += ["pytest_add_cli_args="] + [f"    {a}" for a in ["-p", "no:xdist", "-p", "no:cacheprovider"]]
    lines += [f"    --deselect={t}" for t in SKIP]
    # the front ends' tests load the extension's entry scripts from the checkout's root
    lines += ["also_copy="] + [f"    {d}" for d in ("scripts", "bench")]
    lines += ["process_isolation=forkserver", "use_git_change_detection=false"]
    return "\n".join(lines) + "\n"


def _workspace(paths: list[str], tests: list[str]) -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    for name in ("lib_vaebatch", "tests", "bench", "scripts"):
        link = WORK / name
        if not link.is_symlink():
            link.symlink_to(ROOT / name)
    shutil.copy(ROOT / "pyproject.toml", WORK / "pyproject.toml")
    (WORK / "setup.cfg").write_text(_config(paths, tests))


def _mutmut(*args: str, quiet: bool = False) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORK)}
    cmd = [sys.executable, "-m", "mutmut", *args]
    if not quiet:
        return subprocess.call(cmd, cwd=WORK, env=env)
    proc = subprocess.run(cmd, cwd=WORK, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n", file=sys.stderr)
    return proc.returncode


def _add_child_process_tests() -> int:
    """Give the child-process tests to the functions their children run (see the module doc)."""
    path = WORK / "mutants" / "mutmut-stats.json"
    data = json.loads(path.read_text())
    tests = list(data["duration_by_test"])
    by_function = data["tests_by_mangled_function_name"]
    added = 0
    for prefix, globs in CHILD_PROCESS_TESTS.items():
        ids = [t for t in tests if t.startswith(prefix)]
        for name, have in by_function.items():
            if any(fnmatch.fnmatchcase(name, g) for g in globs):
                new = [t for t in ids if t not in have]
                have += new
                added += len(new)
    path.write_text(json.dumps(data))
    return added


def _reset_unkilled(paths: list[str]) -> int:
    """Forget the results of the mutants not killed so far in ``paths`` (mutmut keeps a result
    until the mutated function changes; the tests may have changed since): they run again."""
    reset = 0
    for glob in _globs(paths):
        for meta in (WORK / "mutants").glob(
            f"{glob.rstrip('*')}*.meta" if glob.endswith("*") else f"{glob}.meta"
        ):
            data = json.loads(meta.read_text())
            codes = data["exit_code_by_key"]
            for key, code in codes.items():
                if code is not None and code not in (1, 3):  # 1 and 3: killed
                    codes[key] = None
                    reset += 1
            meta.write_text(json.dumps(data))
    return reset


def _mutant_names(paths: list[str]) -> list[str]:
    out: list[str] = []
    for glob in _globs(paths):
        pattern = f"{glob.rstrip('*')}*.meta" if glob.endswith("*") else f"{glob}.meta"
        for meta in sorted((WORK / "mutants").glob(pattern)):
            out += sorted(json.loads(meta.read_text())["exit_code_by_key"])
    return out


def _draw(paths: list[str], n: int, seed: int) -> list[str]:
    """``n`` mutant names drawn uniformly without replacement (sorted names, seeded): the same
    code and seed give the same sample, so a run before and after a change of the tests compares
    the same mutants."""
    import random

    names = _mutant_names(paths)
    return sorted(random.Random(seed).sample(names, min(n, len(names))))


def _status_counts(only: list[str] | None = None) -> dict[str, Counter[str]]:
    from mutmut.__main__ import walk_mutatable_files
    from mutmut.mutation.data import SourceFileMutationData
    from mutmut.stats import status_by_exit_code

    counts: dict[str, Counter[str]] = {}
    for path in walk_mutatable_files():
        m = SourceFileMutationData(path=path)
        m.load()
        codes = [v for k, v in m.exit_code_by_key.items() if only is None or k in only]
        c = Counter(status_by_exit_code[v] for v in codes)
        if c:
            counts[str(path)] = c
    return counts


def _summary(only: list[str] | None = None) -> dict[str, dict[str, int]]:
    code = (
        f"import json, sys; sys.path.insert(0, {str(ROOT)!r}); from tests.mutate import _status_counts;"
        f"only = {only!r} and set({only!r});"
        "print(json.dumps({k: dict(v) for k, v in _status_counts(only).items()}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=WORK, capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHONPATH": str(WORK)},
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def _print(summary: dict[str, dict[str, int]]) -> None:
    kinds = ("killed", "survived", "no tests", "timeout", "suspicious", "segfault", "not checked")
    print(f"{'module':44} " + " ".join(f"{k:>11}" for k in kinds))
    for module, c in sorted(summary.items()):
        print(f"{module:44} " + " ".join(f"{c.get(k, 0):>11}" for k in kinds))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="./dev.sh mutate", description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="*", help="modules or folders under lib_vaebatch/")
    ap.add_argument("--tests", nargs="+", help="the tests to run (default: COVERING's for the paths)")
    ap.add_argument("--report", action="store_true", help="the last run's counts and survivors")
    ap.add_argument("--max-children", type=int, default=2, help="mutants tested at a time (default 2)")
    ap.add_argument("--fresh", action="store_true", help="forget every earlier result and trace first")
    ap.add_argument("--sample", type=int, metavar="N", help="test N mutants drawn (seeded) from the paths'")
    ap.add_argument("--seed", type=int, default=23, help="seed of --sample (default 23)")
    args = ap.parse_args(argv)
    global WORK
    if args.report:
        for summary in sorted(BASE.glob("*/summary.json")):
            WORK = summary.parent
            _print(json.loads(summary.read_text()))
            _mutmut("results")
        return 0
    if not args.paths:
        ap.error("name the modules to mutate (or --report)")
    WORK = BASE / "+".join(p.strip("/").replace("/", ".") for p in sorted(args.paths))
    tests = args.tests or covering(args.paths)
    print(f"[mutate] {' '.join(args.paths)} with {' '.join(tests)}", flush=True)
    if args.fresh and (WORK / "mutants").exists():
        shutil.rmtree(WORK / "mutants")
    _workspace(args.paths, tests)
    stats = WORK / "mutants" / "mutmut-stats.json"
    if not stats.exists():
        # the trace alone: mutmut traces the tests before it looks for the mutants named, and
        # this name matches none (so it stops there, with an error that is expected)
        print("[mutate] tracing which test calls which function", flush=True)
        subprocess.run(
            [sys.executable, "-m", "mutmut", "run", "no.such.mutant"], cwd=WORK, capture_output=True,
            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(WORK)},
        )  # fmt: skip
        if not stats.exists():
            return _mutmut("run", "no.such.mutant")  # again, to show why
    print(f"[mutate] {_add_child_process_tests()} (function, child-process test) pairs added", flush=True)
    print(f"[mutate] {_reset_unkilled(args.paths)} mutant(s) not killed before are tested again", flush=True)
    names: list[str] = []
    if args.sample:
        names = _draw(args.paths, args.sample, args.seed)
        (WORK / "sample.txt").write_text("\n".join(names) + "\n")
        print(f"[mutate] a sample of {len(names)} mutants (seed {args.seed}): sample.txt", flush=True)
    rc = _mutmut("run", "--max-children", str(args.max_children), *names)
    summary = _summary(names or None)
    (WORK / "summary.json").write_text(json.dumps(summary, indent=1))
    _print(summary)
    return rc


if __name__ == "__main__":
    sys.exit(main())
