"""Saving: only slimkit's own directories are replaced, modes are kept, stale scratch
directories are tidied, the directory exchange and its fallback, disk errors, the command
line's output staging and temporary baselines."""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import SafetensorError
from torch import nn

import slimkit
from slimkit import cli
from slimkit.errors import ArtifactError
from slimkit.io import layout, scratch
from slimkit.io import save as save_mod


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def model(seed: int) -> Small:
    torch.manual_seed(seed)
    return Small().eval()


def files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def one_line(e: pytest.ExceptionInfo[BaseException]) -> str:
    text = str(e.value)
    assert "\n" not in text
    return text


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


def stale_dir(target: Path, kind: str, pid: int, *names: str) -> Path:
    d = target.parent / scratch.scratch_name(target, kind, pid=pid)
    d.mkdir()
    for name in names:
        (d / name).write_bytes(b"x")
    return d


@pytest.fixture
def art(tmp_path: Path) -> Path:
    return slimkit.save(model(0), tmp_path / "art")


# -- 1. only slimkit's own directories are replaced -------------------------------------------
def test_overwrite_of_foreign_directory_keeps_symlink_and_fifo(tmp_path: Path) -> None:
    d = tmp_path / "mine"
    d.mkdir()
    (tmp_path / "elsewhere.txt").write_text("linked")
    (d / "link").symlink_to(tmp_path / "elsewhere.txt")
    os.mkfifo(d / "pipe")
    before = sorted(os.listdir(d))
    with pytest.raises(ArtifactError) as e:
        slimkit.save(model(1), d, overwrite=True)
    assert str(d) in one_line(e) and "'link'" in one_line(e)
    assert sorted(os.listdir(d)) == before
    assert (d / "link").is_symlink() and stat.S_ISFIFO((d / "pipe").lstat().st_mode)
    assert sorted(os.listdir(tmp_path)) == ["elsewhere.txt", "mine"]


def _add_file(d: Path) -> None:
    (d / "notes.txt").write_text("mine")


def _add_dir(d: Path) -> None:
    (d / "notes.txt").mkdir()


def _add_symlinked_report(d: Path) -> None:
    (d / "notes.txt").symlink_to("/etc/hostname")


def _add_fifo(d: Path) -> None:
    os.mkfifo(d / "notes.txt")


@pytest.mark.parametrize("add", [_add_file, _add_dir, _add_symlinked_report, _add_fifo])
@pytest.mark.parametrize("overwrite", [False, True])
def test_artifact_with_a_foreign_entry_refused(art: Path, add: Any, overwrite: bool) -> None:
    add(art)
    (art / "report.md").write_text("kept")
    before = sorted(os.listdir(art))
    with pytest.raises(ArtifactError) as e:
        slimkit.save(model(1), art, overwrite=overwrite)
    assert one_line(e).startswith(f"{art} holds 'notes.txt'")
    assert sorted(os.listdir(art)) == before
    assert sorted(os.listdir(art.parent)) == ["art"]


def test_first_foreign_entry_is_named(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    for name in ("zeta", "report.md", "alpha"):
        (d / name).write_text("x")
    with pytest.raises(ArtifactError, match="holds 'alpha'"):
        slimkit.save(model(1), d, overwrite=True)


@pytest.mark.parametrize("name", ["report.md", "slimkit.json"])
def test_symlinked_own_file_is_foreign(art: Path, tmp_path: Path, name: str) -> None:
    outside = tmp_path / "outside"
    outside.write_text("not slimkit's")
    (art / name).unlink(missing_ok=True)
    (art / name).symlink_to(outside)
    with pytest.raises(ArtifactError, match=f"holds '{name}'"):
        slimkit.save(model(1), art, overwrite=True)
    assert outside.read_text() == "not slimkit's"


def test_own_files_without_manifest_refused(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    (d / "report.md").write_text("# a report\n")
    (d / "model.safetensors").write_bytes(b"someone's weights")
    with pytest.raises(ArtifactError, match="no slimkit manifest") as e:
        slimkit.save(model(1), d, overwrite=True)
    assert "'model.safetensors'" in one_line(e)
    assert (d / "model.safetensors").read_bytes() == b"someone's weights"


def test_foreign_manifest_refused(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    (d / "slimkit.json").write_text('{"format": "something-else"}')
    with pytest.raises(ArtifactError, match="no slimkit manifest"):
        slimkit.save(model(1), d, overwrite=True)
    assert (d / "slimkit.json").read_text() == '{"format": "something-else"}'


def test_empty_directory_accepted_without_overwrite(tmp_path: Path) -> None:
    d = tmp_path / "empty"
    d.mkdir()
    slimkit.save(model(1), d)
    assert sorted(os.listdir(d)) == ["model.safetensors", "slimkit.json"]


def test_artifact_with_every_side_file_is_replaced_without_them(art: Path) -> None:
    for name in layout.SIDE_FILES:
        (art / name).write_text("the old model's")
    (art / ".report.md.slimkit-tmp.0123abcd").write_text("an interrupted write")
    slimkit.save(model(1), art, overwrite=True)
    assert sorted(os.listdir(art)) == ["model.safetensors", "slimkit.json"]
    loaded = slimkit.load(art, model=Small())
    assert torch.equal(loaded.fc.weight, model(1).fc.weight)


def test_side_files_are_what_slimkit_writes() -> None:
    from slimkit.nas import stage
    from slimkit.report import write

    written = {write.JSON_NAME, write.MARKDOWN_NAME, write.PLOT_NAME}
    assert set(layout.SIDE_FILES) == written | {stage.SEARCH_PLOT, stage.SEARCH_FRONT}


def test_symlink_to_directory_saves_into_it(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    assert slimkit.save(model(1), tmp_path / "link") == real
    assert (tmp_path / "link").is_symlink() and layout.is_artifact(real)


@pytest.mark.parametrize("mode", [0o755, 0o750, 0o2775])
def test_overwrite_keeps_directory_mode(art: Path, mode: int) -> None:
    os.chmod(art, mode)
    slimkit.save(model(1), art, overwrite=True)
    assert stat.S_IMODE(art.stat().st_mode) == mode


def test_empty_directory_keeps_its_mode(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    os.chmod(d, 0o751)
    slimkit.save(model(1), d)
    assert stat.S_IMODE(d.stat().st_mode) == 0o751


def test_new_directory_and_files_follow_umask(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        d = slimkit.save(model(1), tmp_path / "new")
    finally:
        os.umask(old)
    assert stat.S_IMODE(d.stat().st_mode) == 0o750
    for name in ("model.safetensors", "slimkit.json"):
        assert stat.S_IMODE((d / name).stat().st_mode) == 0o640, name


# -- 2. stale scratch directories ----------------------------------------------------------------
def test_stale_staging_of_a_killed_save_removed(art: Path) -> None:
    pid = dead_pid()
    stage = stale_dir(art, "stage", pid, "model.safetensors")
    baseline = stale_dir(art, "baseline", pid)
    legacy = art.parent / ".art.k3_x9q0z.tmp"  # how older versions named their staging
    legacy.mkdir()
    (legacy / "model.safetensors").write_bytes(b"partial")
    os.utime(legacy, (time.time() - 3600, time.time() - 3600))
    slimkit.save(model(1), art, overwrite=True)
    assert not stage.exists() and not baseline.exists() and not legacy.exists()
    assert sorted(os.listdir(art.parent)) == ["art"]


def test_scratch_of_others_left_alone(art: Path) -> None:
    pid = dead_pid()
    others = [
        stale_dir(art.parent / "other", "stage", pid),  # another target
        art.parent / f".art.slimkit-stage.{pid}.xyz",  # not our pattern
        art.parent / ".art.k3_x9q0z.tmp",  # legacy name, but holds a foreign file
    ]
    others[1].mkdir()
    others[2].mkdir()
    (others[2] / "notes.txt").write_text("x")
    os.utime(others[2], (time.time() - 3600, time.time() - 3600))
    as_file = art.parent / scratch.scratch_name(art, "stage", pid=pid)
    as_file.write_text("a file, not a directory")
    slimkit.save(model(1), art, overwrite=True)
    assert all(p.exists() for p in [*others, as_file])


LOCKER = """
import fcntl, os, sys
path = os.path.join(sys.argv[1], f".{sys.argv[2]}.slimkit-stage.{os.getpid()}.0123abcd")
os.mkdir(path)
fd = os.open(path, os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_EX)
print(path, flush=True)
sys.stdin.read()
"""


def test_staging_of_a_running_save_kept(art: Path) -> None:
    args = [sys.executable, "-c", LOCKER, str(art.parent), art.name]
    proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        path = Path(proc.stdout.readline().strip())
        assert path.is_dir()
        os.utime(path, (time.time() - 3600, time.time() - 3600))  # old, but locked
        slimkit.save(model(1), art, overwrite=True)
        assert path.is_dir()
    finally:
        proc.kill()
        proc.wait()
    slimkit.save(model(2), art, overwrite=True)  # its process is gone: stale now
    assert not path.exists()


def test_unlocked_scratch_of_a_live_process_kept_while_young(art: Path) -> None:
    young = stale_dir(art, "stage", os.getpid())  # made, not yet locked: a save starting
    slimkit.save(model(1), art, overwrite=True)
    assert young.exists()
    os.utime(young, (time.time() - 3600, time.time() - 3600))  # the pid was reused
    slimkit.save(model(2), art, overwrite=True)
    assert not young.exists()


def test_scratch_names_are_unambiguous(tmp_path: Path) -> None:
    target = tmp_path / "a"
    name = scratch.scratch_name(target, "stage", pid=42)
    assert scratch.parse_name(name, target) == ("stage", 42)
    assert scratch.parse_name(name, tmp_path / "a.slimkit-stage") is None
    nested = tmp_path / "a.slimkit-stage.42.0123abcd"
    assert scratch.parse_name(scratch.scratch_name(nested, "old", pid=7), target) is None
    assert scratch.target_of(tmp_path / name / "model.safetensors") == target


# -- 3. the exchange and its fallback ---------------------------------------------------------
def _fail_exchange(code: int) -> Any:
    def renameat2(a: Path, b: Path, flags: int) -> int:
        return code

    return renameat2


@pytest.mark.parametrize("code", [errno.EXDEV, errno.EACCES, errno.EBUSY])
def test_exchange_failure_is_one_line_error(
    art: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    before = files(art)
    monkeypatch.setattr(save_mod, "_renameat2", _fail_exchange(code))
    with pytest.raises(ArtifactError) as e:
        slimkit.save(model(1), art, overwrite=True)
    assert one_line(e) == f"cannot replace {art}: {os.strerror(code)}"
    assert files(art) == before
    assert os.listdir(art.parent) == ["art"]


@pytest.mark.parametrize("code", [errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP])
def test_unsupported_exchange_falls_back_with_a_warning(
    art: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    monkeypatch.setattr(save_mod, "_renameat2", _fail_exchange(code))
    monkeypatch.setattr(save_mod, "_warned_devices", set())
    os.chmod(art, 0o750)
    with pytest.warns(RuntimeWarning, match="two renames"):
        slimkit.save(model(1), art, overwrite=True)
    loaded = slimkit.load(art, model=Small())
    assert torch.equal(loaded.fc.weight, model(1).fc.weight)
    assert stat.S_IMODE(art.stat().st_mode) == 0o750
    assert os.listdir(art.parent) == ["art"]


def test_fallback_failing_second_rename_puts_the_old_back(
    art: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = files(art)
    monkeypatch.setattr(save_mod, "_renameat2", _fail_exchange(errno.EINVAL))
    real_rename, calls = os.rename, []

    def rename(a: Any, b: Any) -> None:
        calls.append(b)
        if len(calls) == 2:
            raise OSError(errno.EIO, "Input/output error")
        real_rename(a, b)

    monkeypatch.setattr(save_mod.os, "rename", rename)
    with pytest.warns(RuntimeWarning), pytest.raises(ArtifactError) as e:
        slimkit.save(model(1), art, overwrite=True)
    assert one_line(e) == f"cannot write {art}: Input/output error"
    assert files(art) == before
    assert os.listdir(art.parent) == ["art"]


def test_crash_between_the_two_renames_restored_by_next_save(art: Path) -> None:
    before = files(art)
    pid = dead_pid()
    old = art.parent / scratch.scratch_name(art, "old", pid=pid)
    os.rename(art, old)  # what a crash after the first rename leaves
    stale_dir(art, "stage", pid, "model.safetensors", "slimkit.json")  # the finished new one
    with pytest.raises(ArtifactError, match="an interrupted save left the previous artifact"):
        slimkit.load(art)  # says where the old one is
    with pytest.warns(RuntimeWarning, match="restored"), pytest.raises(ArtifactError) as e:
        slimkit.save(model(1), art)  # no overwrite: the old artifact is back in the way
    assert "already holds an artifact" in one_line(e)
    assert files(art) == before
    assert os.listdir(art.parent) == ["art"]


def test_stale_old_removed_when_the_new_one_is_in_place(art: Path) -> None:
    old = stale_dir(art, "old", dead_pid(), "model.safetensors", "slimkit.json")
    slimkit.save(model(1), art, overwrite=True)
    assert not old.exists()
    assert os.listdir(art.parent) == ["art"]


# -- 4. disk errors ---------------------------------------------------------------------------
ENOSPC_TEXT = (
    'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
    'left on device" })'
)


def _enospc_safetensors(*args: Any, **kwargs: Any) -> None:
    Path(args[1]).write_bytes(b"partial")
    raise SafetensorError(ENOSPC_TEXT)


def _enospc_os(*args: Any, **kwargs: Any) -> None:
    Path(args[1]).write_bytes(b"partial")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("fail", [_enospc_safetensors, _enospc_os], ids=["safetensors", "os"])
def test_disk_full_is_one_line_and_keeps_the_old(
    art: Path, monkeypatch: pytest.MonkeyPatch, fail: Any
) -> None:
    before = files(art)
    monkeypatch.setattr(save_mod, "save_model", fail)
    with pytest.raises(ArtifactError) as e:
        slimkit.save(model(1), art, overwrite=True)
    assert one_line(e) == f"cannot write {art}: No space left on device"
    assert files(art) == before
    assert os.listdir(art.parent) == ["art"]


def test_manifest_write_failure_keeps_the_old(art: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = files(art)

    def fail_fsync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(save_mod.os, "fsync", fail_fsync)
    with pytest.raises(ArtifactError, match=f"cannot write {art}: Input/output error"):
        slimkit.save(model(1), art, overwrite=True)
    monkeypatch.undo()
    assert files(art) == before
    assert os.listdir(art.parent) == ["art"]


def _read_only_mkdir(path: Any, mode: int = 0o777, *args: Any, **kwargs: Any) -> None:
    raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))


def test_read_only_parent_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "mkdir", _read_only_mkdir)
    with pytest.raises(ArtifactError) as e:
        slimkit.save(model(1), tmp_path / "sub" / "out")
    assert one_line(e) == f"cannot write {tmp_path / 'sub' / 'out'}: Read-only file system"
    assert os.listdir(tmp_path) == []


def test_bad_source_date_epoch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    with pytest.raises(ArtifactError, match="SOURCE_DATE_EPOCH='yesterday'"):
        slimkit.save(model(1), tmp_path / "a")
    assert os.listdir(tmp_path) == []


# -- the command line: staging, baselines, signals ------------------------------------------
TASK = ["--task", "digits-mlp", "--recipe", "w8-rtn"]


def run(capsys: pytest.CaptureFixture[str], *args: Any) -> tuple[int, str]:
    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def scratch_left(parent: Path) -> list[str]:
    return sorted(n for n in os.listdir(parent) if ".slimkit-" in n or n.endswith(".tmp"))


def test_cli_unwritable_out_exits_2_before_the_baseline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(os, "mkdir", _read_only_mkdir)
    monkeypatch.setattr(cli, "_baseline", _never)
    out = tmp_path / "ro" / "out"
    code, text = run(capsys, "compress", *TASK, "--out", out)
    assert code == 2, text
    (line,) = (ln for ln in text.splitlines() if ln.startswith("error:"))
    assert line == f"error: cannot write {out}: Read-only file system"
    assert "Traceback" not in text


def _never(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("the baseline must not be evaluated")


class Stop(Exception):
    pass


def _stop_at_evaluate(seen: dict[str, Any]) -> Any:
    """An ``_evaluate`` that records the scratch directories beside the output and stops."""

    def evaluate(task: Any, cands: list[Any], *args: Any) -> Any:
        seen["parent"] = sorted(os.listdir(cands[1].artifact_dir.parent))
        seen["baseline"] = cands[0].artifact_dir
        raise Stop

    return evaluate


def test_cli_failure_keeps_old_model_and_its_reports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    slimkit.save(model(0), out)
    (out / "report.json").write_text('{"old": true}')
    before = files(out)
    seen: dict[str, Any] = {}
    monkeypatch.setattr(cli, "_evaluate", _stop_at_evaluate(seen))
    with pytest.raises(Stop):
        cli.compress_cmd(
            task="digits-mlp", recipe="w8-rtn", out=out, overwrite=True, runs=10, threads=1
        )
    kinds = sorted(n.split(".slimkit-")[1].split(".")[0] for n in seen["parent"] if n != "out")
    assert kinds == ["baseline", "stage"]  # both beside the output, not in /tmp
    assert seen["baseline"].parent.parent == tmp_path
    assert files(out) == before
    assert scratch_left(tmp_path) == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_cli_signal_removes_scratch_and_restores_handlers(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    signum: int,
) -> None:
    def evaluate(*args: Any) -> Any:
        os.kill(os.getpid(), signum)
        time.sleep(5)  # the handler raises before this ends
        raise AssertionError("not interrupted")

    monkeypatch.setattr(cli, "_evaluate", evaluate)
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    code, text = run(capsys, "compress", *TASK, "--out", tmp_path / "out", "--threads", "1")
    assert code == 128 + signum, text
    assert "interrupted" in text
    assert os.listdir(tmp_path) == []
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_cli_stale_baseline_removed_by_next_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    stale = stale_dir(out, "baseline", dead_pid(), "slimkit.json")
    monkeypatch.setattr(cli, "_evaluate", _stop_at_evaluate({}))
    with pytest.raises(Stop):
        cli.compress_cmd(task="digits-mlp", recipe="w8-rtn", out=out, runs=10, threads=1)
    assert not stale.exists()
    assert os.listdir(tmp_path) == []


def test_eval_baseline_beside_the_artifact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from slimkit import tasks

    the_task = tasks.get("digits-mlp")
    art = save_mod.save(the_task.model(), tmp_path / "art", task=the_task)
    seen: dict[str, Any] = {}

    def evaluate(task: Any, cands: list[Any], *args: Any) -> Any:
        seen["baseline"] = cands[0].artifact_dir
        raise Stop

    monkeypatch.setattr(cli, "_evaluate", evaluate)
    with pytest.raises(Stop):
        cli.eval_cmd(artifact=art, runs=10, threads=1)
    assert seen["baseline"].parent.parent == tmp_path
    assert scratch.parse_name(seen["baseline"].parent.name, art) is not None
    assert os.listdir(tmp_path) == ["art"]


def test_cli_overwrite_replaces_model_and_reports_together(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    slimkit.save(model(0), out)
    (out / "report.json").write_text('{"old": true}')
    (out / "search_front.json").write_text('{"old": true}')
    os.chmod(out, 0o750)
    code, text = run(capsys, "compress", *TASK, "--out", out, "--overwrite", "--threads", "1")
    assert code == 0, text
    names = sorted(os.listdir(out))
    assert names == ["model.safetensors", "pareto.png", "report.json", "report.md", "slimkit.json"]
    report = json.loads((out / "report.json").read_text())
    assert report["results"][1]["recipe"] == "w8-rtn"
    assert stat.S_IMODE(out.stat().st_mode) == 0o750
    assert os.listdir(tmp_path) == ["out"]


def test_eval_baseline_in_temp_dir_when_beside_is_read_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tempfile

    from slimkit import tasks

    the_task = tasks.get("digits-mlp")
    art = save_mod.save(the_task.model(), tmp_path / "ro" / "art", task=the_task)
    real_mkdir, seen = os.mkdir, {}

    def mkdir(path: Any, mode: int = 0o777, *args: Any, **kwargs: Any) -> None:
        if str(path).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        real_mkdir(path, mode, *args, **kwargs)

    def evaluate(task: Any, cands: list[Any], *args: Any) -> Any:
        seen["baseline"] = cands[0].artifact_dir
        raise Stop

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(cli, "_evaluate", evaluate)
    with pytest.raises(Stop):
        cli.eval_cmd(artifact=art, runs=10, threads=1)
    assert seen["baseline"].parent.parent == Path(tempfile.gettempdir())
    assert scratch.parse_name(seen["baseline"].parent.name, art) is not None
    assert not seen["baseline"].parent.exists()
    assert os.listdir(tmp_path / "ro") == ["art"]
