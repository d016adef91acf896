"""Crash safety of saving: ``kill -9`` at random moments, then check what is on disk.

Two kinds of run are killed:

- ``save``: a process doing ``slimkit.save(model, target, overwrite=True)`` of a model of a
  few MB, alternately model A and model B (forked from a server process that imported
  torch once, so each kill costs milliseconds); ``--fallback`` also runs them with the
  atomic exchange reported unsupported, so the two-rename fallback is what gets killed;
- ``compress``: ``slimkit compress --task digits-lenet --overwrite``, alternately with two
  recipes, killed anywhere from start-up to the end.

After each kill the target must be the old artifact or the new one, whole and bit-exact:
both files byte-identical to a reference save (``SOURCE_DATE_EPOCH=0`` makes them
reproducible), and every tensor of the loaded model equal to the reference's; for
``compress`` the report beside it must be that model's. Then one run is let finish, and no
scratch directory (``.<name>.slimkit-*``) may remain beside the target.

    python benchmarks/crash.py [--kills 20] [--mb 8] [--compress-kills 20] [--seed 0]

Writes ``benchmarks/results/crash.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import cpu_line, markdown_table

from slimkit.atomic import write_text

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
OUTCOMES = ("old whole", "new whole", "broken")
ARTIFACT_FILES = ("model.safetensors", "slimkit.json")
COMPRESS_TASK = "digits-lenet"
COMPRESS_RECIPES = ("w8-rtn", "prune-magnitude-50")
ENV = {"SOURCE_DATE_EPOCH": "0"}

#: the save server: builds models A and B, writes their references, then forks one saving
#: child per ``save a|b 0|1`` line of stdin (1: with the exchange reported unsupported) and
#: reports ``pid`` and then ``done <status>``
SERVER = r"""
import errno, os, sys
import torch
torch.set_num_threads(1)
import slimkit
from slimkit.io import save as save_mod
sys.path.insert(0, sys.argv[1])
from crash import build_model
work, mb = sys.argv[2], float(sys.argv[3])
save_mod._warned_devices.add(os.stat(work).st_dev)  # no fallback warnings
models = {"a": build_model(mb, 1), "b": build_model(mb, 2)}
for name, model in models.items():
    slimkit.save(model, os.path.join(work, "refs", name))
target = os.path.join(work, "out", "target")
print("ready", flush=True)
for line in sys.stdin:
    _, which, fallback = line.split()
    pid = os.fork()
    if pid == 0:
        if fallback == "1":
            save_mod._renameat2 = lambda a, b, flags: errno.EINVAL
        slimkit.save(models[which], target, overwrite=True)
        os._exit(0)
    print(pid, flush=True)
    _, status = os.waitpid(pid, 0)
    print("done", status, flush=True)
"""


# -- models and checks ------------------------------------------------------------------------
def build_model(mb: float, seed: int) -> Any:
    """A stack of square linear layers of about ``mb`` MB of float32 weights."""
    import torch
    from torch import nn

    width = 512
    layers = max(1, round(mb * 2**20 / (4 * width * width)))
    torch.manual_seed(seed)
    return nn.Sequential(*(nn.Linear(width, width) for _ in range(layers))).eval()


def artifact_bytes(d: Path) -> dict[str, bytes] | None:
    """The artifact files of ``d``; None when one is missing."""
    try:
        return {name: (d / name).read_bytes() for name in ARTIFACT_FILES}
    except OSError:
        return None


def tensors_equal(d: Path, ref: Path, model: Any | None) -> bool:
    """Load ``d`` (into ``model`` when given) and compare every tensor with ``ref``'s file."""
    import torch
    from safetensors.torch import load_file

    import slimkit

    try:
        loaded = slimkit.load(d, model=model)
    except Exception:
        return False
    state = loaded.state_dict()
    expected = load_file(ref / "model.safetensors")
    return all(name in state and torch.equal(state[name], t) for name, t in expected.items())


def classify(target: Path, old: Path, new: Path, load_into: Callable[[], Any] | None) -> str:
    """``old whole``, ``new whole`` or ``broken``: the target's files against two references."""
    found = artifact_bytes(target)
    for label, ref in (("old whole", old), ("new whole", new)):
        if found is not None and found == artifact_bytes(ref):
            model = load_into() if load_into is not None else None
            return label if tensors_equal(target, ref, model) else "broken"
    return "broken"


def stray(parent: Path) -> list[str]:
    """Scratch and temporary entries beside the target."""
    return sorted(n for n in os.listdir(parent) if ".slimkit-" in n or n.endswith(".tmp"))


def report_matches(target: Path) -> bool:
    """True when the report beside the artifact is about that artifact's recipe."""
    try:
        manifest = json.loads((target / "slimkit.json").read_text())
        report = json.loads((target / "report.json").read_text())
    except (OSError, ValueError):
        return False
    return bool(report["results"][1]["recipe"] == manifest["recipe"]["name"])


# -- killing saves ------------------------------------------------------------------------------
class SaveServer:
    """The server process of ``SERVER``: one forked child per save."""

    def __init__(self, work: Path, mb: float) -> None:
        (work / "out").mkdir(parents=True)
        args = [sys.executable, "-c", SERVER, str(HERE), str(work), str(mb)]
        env = {**os.environ, **ENV}
        self.proc = subprocess.Popen(
            args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        if self._line() != "ready":
            raise RuntimeError("the save server did not start")

    def _line(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def save(self, which: str, fallback: bool = False, kill_after: float | None = None) -> bool:
        """Save model ``which`` (``fallback``: by two renames); kill it ``kill_after`` seconds
        in. True when it was killed before it ended."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"save {which} {int(fallback)}\n")
        self.proc.stdin.flush()
        pid, killed = int(self._line()), False
        if kill_after is not None:
            time.sleep(kill_after)
            try:
                os.kill(pid, signal.SIGKILL)  # not reaped before this: the pid is still its
                killed = True
            except ProcessLookupError:
                pass
        status = int(self._line().split()[1])
        return killed and os.WIFSIGNALED(status)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=30)


def run_saves(
    work: Path, kills: int, mb: float, rng: random.Random, modes: tuple[bool, ...] = (False, True)
) -> list[dict[str, Any]]:
    """``kills`` killed saves per mode (False: exchange, True: the two-rename fallback); per
    mode the outcome counts and the stray entries after each next save."""
    server = SaveServer(work, mb)
    try:
        return [_kill_saves(server, work, kills, mb, fallback, rng) for fallback in modes]
    finally:
        server.close()


def _kill_saves(
    server: SaveServer, work: Path, kills: int, mb: float, fallback: bool, rng: random.Random
) -> dict[str, Any]:
    target, refs = work / "out" / "target", work / "refs"
    start = time.perf_counter()
    server.save("a", fallback)
    seconds = time.perf_counter() - start
    current, counts, strays, killed = "a", Counter[str](), 0, 0
    for _ in range(kills):
        other = "b" if current == "a" else "a"
        killed += server.save(other, fallback, kill_after=rng.uniform(0, 1.2 * seconds))
        _recover(target)
        outcome = classify(target, refs / current, refs / other, lambda: build_model(mb, 0))
        counts[outcome] += 1
        current = other if outcome == "new whole" else current
        server.save(current, fallback)  # the next save, let finish
        strays += len(stray(target.parent))
    mode = "save (two-rename fallback)" if fallback else "save (exchange)"
    return _row(mode, kills, killed, counts, strays, seconds)


def _recover(target: Path) -> None:
    """What the next save does first: a crash between the fallback's two renames leaves the
    old artifact under a scratch name, moved back here."""
    import warnings

    from slimkit.io import scratch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scratch.tidy(target)


def _row(
    mode: str, runs: int, killed: int, counts: Counter[str], strays: int, seconds: float
) -> dict[str, Any]:
    return {
        "mode": mode,
        "runs": runs,
        "killed": killed,
        **{o: counts[o] for o in OUTCOMES},
        "stray_after_next": strays,
        "run_seconds": round(seconds, 3),
    }


# -- killing compress ---------------------------------------------------------------------------
def compress_cmd(recipe: str, out: Path) -> list[str]:
    return [sys.executable, "-m", "slimkit", "compress", "--task", COMPRESS_TASK,
            "--recipe", recipe, "--out", str(out), "--overwrite"]  # fmt: skip


def run_compress(work: Path, kills: int, rng: random.Random) -> dict[str, Any]:
    """``kills`` killed ``compress --overwrite`` runs, alternating two recipes."""
    env = {**os.environ, **ENV}
    refs = {r: work / "refs" / r for r in COMPRESS_RECIPES}
    start = time.perf_counter()
    for recipe, ref in refs.items():  # the references; the task model is trained and cached
        subprocess.run(compress_cmd(recipe, ref), env=env, check=True, capture_output=True)
    seconds = (time.perf_counter() - start) / len(refs)
    target = work / "out" / "target"
    target.parent.mkdir(parents=True)
    current = COMPRESS_RECIPES[0]
    subprocess.run(compress_cmd(current, target), env=env, check=True, capture_output=True)
    counts, strays, killed, tmp_before = Counter[str](), 0, 0, _tmp_baselines()
    for _ in range(kills):
        other = COMPRESS_RECIPES[1] if current == COMPRESS_RECIPES[0] else COMPRESS_RECIPES[0]
        proc = subprocess.Popen(compress_cmd(other, target), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        time.sleep(rng.uniform(0, 1.1 * seconds))
        killed += proc.poll() is None
        proc.kill()
        proc.wait()
        outcome = classify(target, refs[current], refs[other], None)
        if outcome != "broken" and not report_matches(target):
            outcome = "broken"  # a model with another model's report
        counts[outcome] += 1
        current = other if outcome == "new whole" else current
        subprocess.run(compress_cmd(current, target), env=env, check=True, capture_output=True)
        strays += len(stray(target.parent))
    strays += len(_tmp_baselines() - tmp_before)
    return _row(f"compress --overwrite ({COMPRESS_TASK})", kills, killed, counts, strays, seconds)


def _tmp_baselines() -> set[str]:
    """Baseline directories in the system's temporary directory (older versions put them there)."""
    return {n for n in os.listdir(tempfile.gettempdir()) if "slimkit-baseline" in n}


# -- the table (pure) -----------------------------------------------------------------------------
def table(rows: list[dict[str, Any]]) -> str:
    header = (
        "| run | runs | killed mid-run | old whole | new whole | broken "
        "| stray dirs after next run | one run (s) |"
    )
    body = [
        [
            r["mode"],
            str(r["runs"]),
            str(r["killed"]),
            *(str(r[o]) for o in OUTCOMES),
            str(r["stray_after_next"]),
            f"{r['run_seconds']:.2f}",
        ]
        for r in rows
    ]
    return markdown_table(header, body)


def passed(rows: list[dict[str, Any]]) -> bool:
    return all(r["broken"] == 0 and r["stray_after_next"] == 0 for r in rows)


def render(rows: list[dict[str, Any]], cpu: str) -> str:
    verdict = "every kill left a whole artifact" if passed(rows) else "SOME KILLS BROKE THINGS"
    return (
        f"# Crash safety of saving\n\nCPU: {cpu}. Each run killed with SIGKILL at a random "
        "moment; 'killed mid-run' counts the kills that landed before the run ended.\n\n"
        + table(rows)
        + f"\nResult: {verdict}.\n"
    )


def run(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20, help="killed saves per mode")
    parser.add_argument("--mb", type=float, default=8.0, help="model size of the saves")
    parser.add_argument("--compress-kills", type=int, default=20)
    parser.add_argument("--no-fallback", action="store_true", help="skip the fallback mode")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    rows = []
    with tempfile.TemporaryDirectory(prefix="crash-") as tmp:
        modes = (False,) if args.no_fallback else (False, True)
        rows += run_saves(Path(tmp) / "save", args.kills, args.mb, rng, modes)
        print(table(rows), flush=True)
        if args.compress_kills:
            rows.append(run_compress(Path(tmp) / "compress", args.compress_kills, rng))
    cpu = cpu_line()
    text = render(rows, cpu)
    print("\n" + text, flush=True)
    if not args.no_write:
        RESULTS.mkdir(exist_ok=True)
        result = {"cpu_model": cpu, "rows": rows, "passed": passed(rows)}
        write_text(RESULTS / "crash.json", json.dumps(result, indent=2) + "\n")
        write_text(RESULTS / "crash.md", text)
    return rows


if __name__ == "__main__":
    run()
