"""Crash-safe overwrites (jaxmodels.atomic, used by save_checkpoint and the merging CLI): a child process is
SIGKILLed at every step of a replacement, and afterwards the output is the complete old or the complete new one,
never nothing or half, and the next overwrite succeeds and leaves no leftovers.

The steps are the calls of ``jaxmodels.atomic._step`` (a no-op hook the child replaces by a SIGKILL); "removing"
kills after the first file of the old tree is deleted, "mid_write" after the CLI wrote its first tensor. Steps
before the swap must leave the old output, steps after it the new one; in the fallback scheme (no
RENAME_EXCHANGE) a kill between the two renames leaves the old tree at ``.{name}.old``, which the next writer or
``recover_output`` puts back.
"""

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import jaxmodels.atomic as atomic
from jaxmodels import io

ROOT = Path(__file__).resolve().parents[2]
ATOMIC_PY = ROOT / "jaxmodels" / "atomic.py"

BEFORE = ["staged", "written", "synced"]
EXCHANGE_STEPS = BEFORE + ["exchanged", "removing", "removed_old", "done"]
FALLBACK_STEPS = BEFORE + ["moved_old", "renamed", "removing", "removed_old", "done"]
SWAPPED = {"exchanged", "renamed", "removing", "removed_old", "done"}

CHILD = r"""
import json, os, signal, sys

def load_atomic(job):
    if job["kind"] == "primitive":  # the stdlib-only module loaded by path: no jax import, starts in ~0.1 s
        import importlib.util
        spec = importlib.util.spec_from_file_location("wl_atomic", job["atomic_py"])
        A = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(A)
        return A
    import jaxmodels.atomic as A
    return A

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def run_job(job):
    A, step = load_atomic(job), job["step"]

    def hook(name):
        if name == step:
            die()
        if step == "removing" and name in ("exchanged", "renamed"):  # die after the first file of the old tree
            real = os.unlink
            def unlink(*a, **k):
                real(*a, **k)
                die()
            os.unlink = unlink

    A._USE_EXCHANGE = job["exchange"]
    A._step = hook
    root = job["root"]
    if job["kind"] == "primitive":
        with A.AtomicOutput(os.path.join(root, "out"), overwrite=True) as p:
            for rel, text in job["files"].items():
                (p / rel).parent.mkdir(parents=True, exist_ok=True)
                (p / rel).write_text(text)
    elif job["kind"] == "checkpoint":
        import numpy as np
        from jaxmodels.io import save_checkpoint
        v = job["v"]
        save_checkpoint(os.path.join(root, "ckpt"),
                        {"w": np.full((4, 8), v, np.float32), "n": {"b": np.arange(8, dtype=np.float32) * v}},
                        overwrite=True)
    elif job["kind"] == "cli":
        import jaxmodels.io
        from merging.cli import run_merge
        if step == "mid_write":
            real = jaxmodels.io.SafetensorsWriter.write
            def write(self, name, array):
                real(self, name, array)
                die()
            jaxmodels.io.SafetensorsWriter.write = write
        run_merge(job["config"], os.path.join(root, "out"), root=root, progress=False, overwrite=True)

if sys.argv[1] != "--serve":  # one job, then exit (never reached when the kill works)
    run_job(json.loads(sys.argv[1]))
    sys.exit(3)
# Fork server: import jax, orbax, merging once (no thread is started by imports alone, so forking is safe), then
# fork one worker per job; the worker initializes its own JAX backend, runs the job and is SIGKILLed at its step.
import threading
import numpy, jaxmodels.io, merging.cli  # noqa: F401
print(json.dumps({"threads": threading.active_count()}), flush=True)
for line in sys.stdin:
    pid = os.fork()
    if pid == 0:
        try:
            run_job(json.loads(line))
            os._exit(3)
        except BaseException:
            import traceback
            traceback.print_exc()
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                      "code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None}), flush=True)
"""


def _env():
    env = dict(os.environ, JAX_PLATFORMS="cpu", WEIGHTLAB_NO_PROGRESS="1")
    env.pop("XLA_FLAGS", None)  # one CPU device is enough in the child
    return env


class _Children:
    """Runs jobs in child processes that get SIGKILLed: forked from one server process that imported jax/merging
    once (each job then costs a fork instead of a 3-10 s interpreter start), or fresh interpreters where the
    server saw threads after its imports (forking would not be safe)."""

    def __init__(self, tmp: Path):
        self.err = open(tmp / "server.err", "w+")
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD, "--serve"], cwd=ROOT, env=_env(), text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err)
        hello = self.proc.stdout.readline()
        self.fork = bool(hello) and json.loads(hello)["threads"] == 1

    def run(self, job):
        if self.fork and job["kind"] != "primitive":
            self.proc.stdin.write(json.dumps(job) + "\n")
            self.proc.stdin.flush()
            res = json.loads(self.proc.stdout.readline())
            ok, detail = res["signal"] == signal.SIGKILL, res
        else:
            r = subprocess.run([sys.executable, "-c", CHILD, json.dumps(job)], cwd=ROOT, env=_env(),
                               capture_output=True, text=True, timeout=300)
            ok, detail = r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-3000:])
        if not ok:
            self.err.seek(0)
            pytest.fail(f"child was not killed at step {job['step']!r}: {detail} {self.err.read()[-3000:]}")

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self.err.close()


@pytest.fixture(scope="module")
def children(tmp_path_factory):
    c = _Children(tmp_path_factory.mktemp("children"))
    yield c
    c.close()


def _skip_without_exchange(exchange, d):
    if exchange and not atomic.exchange_supported(d):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here (the fallback cases cover this system)")


def _cases():
    return ([pytest.param(True, s, id=f"exchange-{s}") for s in EXCHANGE_STEPS]
            + [pytest.param(False, s, id=f"fallback-{s}") for s in FALLBACK_STEPS])


# ------------------------------------------------------------------------------------------ the primitive


def _files(v):
    return {f"f{i}.txt": f"{v}-{i}" for i in range(3)} | {"sub/g.txt": f"{v}-sub", "sub/deep/h.bin": v * 50}


def _write(d: Path, files):
    for rel, text in files.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_text(text)


def _read(d: Path):
    return {str(p.relative_to(d)): p.read_text() for p in d.rglob("*") if p.is_file()}


@pytest.mark.parametrize("exchange,step", _cases())
def test_kill_at_every_step_of_a_directory_replacement(tmp_path, children, exchange, step):
    _skip_without_exchange(exchange, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    _write(out, _files("old"))
    children.run({"kind": "primitive", "step": step, "exchange": exchange, "root": str(tmp_path),
                  "atomic_py": str(ATOMIC_PY), "files": _files("new")})
    if step == "moved_old":  # fallback, killed between the two renames: the old tree waits at .out.old
        assert not out.exists() and _read(tmp_path / ".out.old") == _files("old")
        atomic.recover_output(out)
    assert _read(out) == _files("new" if step in SWAPPED else "old")
    with atomic.AtomicOutput(out, overwrite=True) as p:  # the next overwrite works and cleans every leftover
        p.mkdir()
        _write(p, _files("third"))
    assert _read(out) == _files("third")
    assert sorted(os.listdir(tmp_path)) == ["out"]


# ------------------------------------------------------------------------------------------ save_checkpoint


def _tree(v):
    return {"w": np.full((4, 8), v, np.float32), "n": {"b": np.arange(8, dtype=np.float32) * v}}


def _assert_ckpt(path, v):
    got = io.restore_checkpoint(path)
    np.testing.assert_array_equal(np.asarray(got["w"]), _tree(v)["w"])
    np.testing.assert_array_equal(np.asarray(got["n"]["b"]), _tree(v)["n"]["b"])


@pytest.mark.parametrize("exchange,step", [pytest.param(True, s, id=f"exchange-{s}") for s in EXCHANGE_STEPS]
                         + [pytest.param(False, "moved_old", id="fallback-moved_old")])
def test_save_checkpoint_overwrite_killed_at_every_step(tmp_path, children, exchange, step):
    _skip_without_exchange(exchange, tmp_path)
    path = tmp_path / "ckpt"
    io.save_checkpoint(path, _tree(1.0))
    children.run({"kind": "checkpoint", "step": step, "exchange": exchange, "root": str(tmp_path), "v": 2.0})
    if step == "moved_old":
        assert not path.exists()
        atomic.recover_output(path)
    _assert_ckpt(path, 2.0 if step in SWAPPED else 1.0)
    io.save_checkpoint(path, _tree(3.0), overwrite=True)
    _assert_ckpt(path, 3.0)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_leftover_old_dir_does_not_block_overwrite(tmp_path):
    """0cb843d: a crash after ``os.replace(path, .old)`` left ``.ckpt.old``; every later overwrite then failed with
    ENOTEMPTY (and with the checkpoint gone, the old tree was only in ``.old``). Both states are repaired now."""
    path = tmp_path / "ckpt"
    io.save_checkpoint(path, _tree(1.0))
    stale = tmp_path / ".ckpt.old"
    io.save_checkpoint(stale, _tree(0.0))  # a non-empty leftover next to a complete checkpoint
    io.save_checkpoint(path, _tree(2.0), overwrite=True)
    _assert_ckpt(path, 2.0)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    os.rename(path, stale)  # crash between the two renames: only .ckpt.old holds the checkpoint
    with pytest.raises(io.CheckpointError, match="already exists"):  # repaired first, then refused
        io.save_checkpoint(path, _tree(3.0))
    _assert_ckpt(path, 2.0)
    io.save_checkpoint(path, _tree(3.0), overwrite=True)
    _assert_ckpt(path, 3.0)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


# ------------------------------------------------------------------------------------------ merging CLI


def _family(d: Path):
    rng = np.random.default_rng(0)
    base = {"layers.0.w": rng.standard_normal((8, 4)).astype(np.float32),
            "layers.1.w": rng.standard_normal((8, 4)).astype(np.float32), "norm.b": np.ones(4, np.float32)}
    for i in range(3):
        io.save_safetensors(d / f"m{i}.safetensors", {k: v + 0.1 * i for k, v in base.items()})


def _linear(w):
    return {"merge_method": "linear",
            "models": [{"model": f"m{i}.safetensors", "parameters": {"weight": wi}} for i, wi in enumerate(w)]}


@pytest.fixture(scope="module")
def cli_family(tmp_path_factory):
    from merging.cli import run_merge

    d = tmp_path_factory.mktemp("family")
    _family(d)
    want = {}
    for v, w in (("old", [1.0, 0.0, 0.0]), ("new", [0.0, 0.0, 1.0]), ("third", [0.0, 1.0, 0.0])):
        run_merge(_linear(w), d / f"want_{v}", root=d, progress=False)
        want[v] = io.load_safetensors(d / f"want_{v}", as_numpy=True)
    return d, want


def _assert_merge(out, want):
    got = io.load_safetensors(out, as_numpy=True)
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])


@pytest.mark.parametrize("exchange,step", [pytest.param(True, s, id=f"exchange-{s}")
                                           for s in ["mid_write"] + EXCHANGE_STEPS]
                         + [pytest.param(False, "moved_old", id="fallback-moved_old")])
def test_cli_overwrite_killed_at_every_step(tmp_path, children, cli_family, exchange, step):
    from merging.cli import run_merge

    _skip_without_exchange(exchange, tmp_path)
    fam, want = cli_family
    for f in fam.glob("m*.safetensors"):
        os.link(f, tmp_path / f.name)
    out = tmp_path / "out"
    run_merge(_linear([1.0, 0.0, 0.0]), out, root=tmp_path, progress=False)
    children.run({"kind": "cli", "step": step, "exchange": exchange, "root": str(tmp_path),
                  "config": _linear([0.0, 0.0, 1.0])})
    if step == "moved_old":
        assert not out.exists()
        atomic.recover_output(out)
    _assert_merge(out, want["new" if step in SWAPPED else "old"])
    run_merge(_linear([0.0, 1.0, 0.0]), out, root=tmp_path, progress=False, overwrite=True)
    _assert_merge(out, want["third"])
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []


def test_cli_leftover_old_dir_does_not_block_overwrite(tmp_path, cli_family):
    """0cb843d's ``run_merge(overwrite=True)`` failed with ENOTEMPTY on a ``.out.old`` left by a crash."""
    from merging.cli import run_merge

    fam, want = cli_family
    for f in fam.glob("m*.safetensors"):
        os.link(f, tmp_path / f.name)
    out = tmp_path / "out"
    run_merge(_linear([1.0, 0.0, 0.0]), out, root=tmp_path, progress=False)
    (tmp_path / ".out.old").mkdir()
    (tmp_path / ".out.old" / "model.safetensors").write_bytes(b"stale")
    run_merge(_linear([0.0, 0.0, 1.0]), out, root=tmp_path, progress=False, overwrite=True)
    _assert_merge(out, want["new"])
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []


# ------------------------------------------------------------------------------------------ in-process checks


def test_file_output_error_and_existing_target(tmp_path):
    out = tmp_path / "x.bin"
    with atomic.AtomicOutput(out) as p:
        p.write_bytes(b"one")
    with pytest.raises(FileExistsError) as e:
        atomic.AtomicOutput(out)
    assert e.value.errno == errno.EEXIST
    with pytest.raises(RuntimeError, match="boom"):
        with atomic.AtomicOutput(out, overwrite=True) as p:
            p.write_bytes(b"half")
            raise RuntimeError("boom")
    assert out.read_bytes() == b"one" and sorted(os.listdir(tmp_path)) == ["x.bin"]
    with pytest.raises(FileNotFoundError, match="nothing was written"):
        with atomic.AtomicOutput(out, overwrite=True):
            pass
    assert out.read_bytes() == b"one" and sorted(os.listdir(tmp_path)) == ["x.bin"]
    with atomic.AtomicOutput(out, overwrite=True) as p:  # a file replaced by a directory
        p.mkdir()
        (p / "y").write_text("dir")
    assert (out / "y").read_text() == "dir" and sorted(os.listdir(tmp_path)) == ["x.bin"]
    src = tmp_path / "loose"
    src.write_text("loose")
    atomic.atomic_replace(src, out)
    assert out.read_text() == "loose" and sorted(os.listdir(tmp_path)) == ["x.bin"]


def test_stale_staging_of_a_dead_writer_is_removed_a_live_ones_kept(tmp_path):
    host = atomic._host()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".out.wl{dead_pid}@{host}-abc123.tmp"
    live = tmp_path / f".out.wl{os.getppid()}@{host}-def456.tmp"  # the pytest parent process: alive
    other = tmp_path / ".other.wl1@somehost-xyz.tmp"
    for d in (stale, live, other):
        (d / "out").mkdir(parents=True)
    (tmp_path / ".out.new").mkdir()  # staging of the pre-fix save_checkpoint
    (tmp_path / "out").mkdir()
    atomic.recover_output(tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == sorted([live.name, other.name, "out"])


def test_fallback_is_used_when_the_exchange_is_refused(tmp_path, monkeypatch):
    """A filesystem answering EINVAL to RENAME_EXCHANGE gets the two-rename scheme, with the same result."""
    calls = []

    def refuse(*args):
        calls.append(args)
        import ctypes

        ctypes.set_errno(errno.EINVAL)
        return -1

    monkeypatch.setattr(atomic, "_renameat2", refuse)
    steps = []
    monkeypatch.setattr(atomic, "_step", steps.append)
    out = tmp_path / "out"
    out.mkdir()
    _write(out, _files("old"))
    with atomic.AtomicOutput(out, overwrite=True) as p:
        p.mkdir()
        _write(p, _files("new"))
    assert calls and _read(out) == _files("new") and sorted(os.listdir(tmp_path)) == ["out"]
    assert steps == ["staged", "written", "synced", "moved_old", "renamed", "removed_old", "done"]


def test_save_safetensors_and_atomic_path_fsync_the_directory(tmp_path, monkeypatch):
    synced = []
    real = atomic.fsync_dir
    monkeypatch.setattr(io, "fsync_dir", lambda p: (synced.append(Path(p)), real(p)))
    io.save_safetensors(tmp_path / "a.safetensors", {"x": np.ones(3, np.float32)})
    with io.atomic_path(tmp_path / "b.txt") as t:
        t.write_text("b")
    assert synced == [tmp_path, tmp_path] and (tmp_path / "b.txt").read_text() == "b"
