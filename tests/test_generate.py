"""The data-generation job (``lowrank-ops generate``): results, progress, atomic writes, resuming after a kill."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse.linalg as spla

from lowrank_ops import pde
from lowrank_ops.cli import main as cli_main
from lowrank_ops import generate as generate_module
from lowrank_ops.generate import generate_dataset

# Small enough for the test budget, large enough that the run takes a few seconds after
# its first shard is on disk (so a kill lands mid-run).
_ARGS = ["darcy", "--grid", "20", "--num", "36", "--shard-size", "3", "--seed", "5", "--tol", "1e-10", "--quiet"]


def _cli(out: Path) -> list:
    return [sys.executable, "-m", "lowrank_ops.cli", "generate", *_ARGS, "--out", str(out)]


def _load(path: Path) -> dict:
    with np.load(path) as data:
        return {name: data[name] for name in data.files}


def test_resumes_after_kill_without_loss_or_duplicates(tmp_path):
    reference = tmp_path / "reference.npz"
    assert subprocess.run(_cli(reference), capture_output=True, timeout=300).returncode == 0

    out = tmp_path / "killed.npz"
    parts = tmp_path / "killed.npz.parts"
    process = subprocess.Popen(_cli(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while len(list(parts.glob("shard_*.npz"))) < 2 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    shards_at_kill = sorted(parts.glob("shard_*.npz"))
    assert 2 <= len(shards_at_kill) < 12, "the run was not interrupted mid-way"
    assert not out.exists()
    # A torn write left behind by a kill during a write is ignored (and never read).
    (parts / ".shard_00011.npz.999.tmp").write_bytes(b"partial")

    resumed = subprocess.run(_cli(out), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert not parts.exists()
    expected, actual = _load(reference), _load(out)
    assert sorted(actual) == sorted(expected)
    for name in expected:  # the resumed run did exactly the uninterrupted run's computation
        np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)
    assert sorted(actual["order"].tolist()) == list(range(36))


def test_dataset_contents_match_direct_solves(tmp_path):
    out = generate_dataset("helmholtz", 12, 5, tmp_path / "h.npz", seed=2, tol=1e-10, m=30, k=6, shard_size=2)
    data = _load(out)
    assert data["solution"].shape == (5, 12, 12) and data["coefficient"].shape == (5, 12, 12)
    assert json.loads(str(data["settings"]))["family"] == "helmholtz"
    for index in range(5):
        problem = pde.helmholtz(12, seed=2, index=index)
        np.testing.assert_array_equal(data["coefficient"][index], problem.coefficient.numpy())
        A, b = problem.matrix.to_scipy(), problem.rhs.numpy()
        x = data["solution"][index].reshape(-1)
        assert np.linalg.norm(b - A @ x) / np.linalg.norm(b) <= 1e-10 * (1 + 1e-6)
        assert data["residual"][index] <= 1e-10 * (1 + 1e-6)
        exact = spla.spsolve(A.tocsc(), b)
        assert np.linalg.norm(x - exact) / np.linalg.norm(exact) <= np.linalg.cond(A.toarray()) * 1e-10


def test_rejected_recycled_solve_counts_in_the_cost(tmp_path, monkeypatch):
    """A recycled solution whose true residual misses tol is redone by plain GMRES: the
    saved solution is GMRES's, and iterations / matvecs add both solves (they reported
    the rejected solve's counts alone)."""
    import lowrank_ops.generate as generate

    solve_sequence, gmres, rejected, redone = generate.solve_sequence, generate.gmres, [], []

    def spoiled(problems, **kwargs):  # sample 0's recycled solution is wrong but reported converged
        result = solve_sequence(problems, **kwargs)
        result.solutions[0] = result.solutions[0] * 0.5
        rejected.append(result.infos[0])
        return result

    def counted_gmres(*args, **kwargs):
        x, info = gmres(*args, **kwargs)
        redone.append(info)
        return x, info

    monkeypatch.setattr(generate, "solve_sequence", spoiled)
    monkeypatch.setattr(generate, "gmres", counted_gmres)
    data = _load(generate_dataset("poisson", 6, 2, tmp_path / "p.npz", tol=1e-9, m=10, k=3, shard_size=2))
    assert len(rejected) == 1 and len(redone) == 1 and redone[0].matvecs > 0
    assert data["residual"][0] <= 1e-9 * (1 + 1e-6)
    assert data["iterations"][0] == rejected[0].iterations + redone[0].iterations
    assert data["matvecs"][0] == rejected[0].matvecs + redone[0].matvecs


def test_progress_bar_reports_speed(tmp_path, capsys):
    assert cli_main(["generate", "poisson", "--grid", "8", "--num", "4", "--out", str(tmp_path / "p.npz")]) == 0
    err = capsys.readouterr().err
    assert "4/4" in err and "samples/s" in err and "ETA" in err


def test_rerun_of_a_finished_command_is_done(tmp_path, capsys):
    out = tmp_path / "p.npz"
    command = ["generate", "poisson", "--grid", "8", "--num", "3", "--out", str(out)]
    assert cli_main(command + ["--quiet"]) == 0
    written = out.read_bytes()
    capsys.readouterr()
    assert cli_main(command) == 0
    assert "is complete (3 samples, same settings): nothing to do" in capsys.readouterr().err
    assert out.read_bytes() == written
    assert cli_main(command[:5] + ["4", "--out", str(out), "--quiet"]) == 2  # other settings: refused
    assert "exists; remove it" in capsys.readouterr().err
    assert out.read_bytes() == written


def test_refuses_to_mix_runs_or_overwrite(tmp_path, capsys):
    out = tmp_path / "d.npz"
    parts = tmp_path / "d.npz.parts"
    parts.mkdir()
    (parts / "manifest.json").write_text(json.dumps({"format": 1, "settings": {"family": "darcy", "grid": 99}, "order": []}))
    assert cli_main(["generate", "darcy", "--grid", "8", "--num", "3", "--out", str(out), "--quiet"]) == 2
    assert "unfinished run with other settings" in capsys.readouterr().err
    # A truncated or foreign manifest met json's "Expecting value: line 1 column 1", naming no file.
    for text in ('{"format": 1, "sett', "[1, 2]"):
        (parts / "manifest.json").write_text(text)
        assert cli_main(["generate", "darcy", "--grid", "8", "--num", "3", "--out", str(out), "--quiet"]) == 2
        assert f"{parts / 'manifest.json'} is not a manifest this job wrote" in capsys.readouterr().err
    settings = {"family": "darcy", "grid": 8}
    (parts / "manifest.json").write_text(json.dumps({"format": 1, "settings": settings, "order": [0, 0, 2]}))
    with pytest.raises(ValueError, match="manifest.json holds no solve order of the 3 samples"):
        generate_module._open_run(parts, settings, "darcy", 8, 3, 0)
    (parts / "manifest.json").unlink()
    out.write_bytes(b"")
    assert cli_main(["generate", "darcy", "--grid", "8", "--num", "3", "--out", str(out), "--quiet"]) == 2
    assert "exists; remove it" in capsys.readouterr().err
    with pytest.raises(ValueError, match="num must be an integer >= 1"):
        generate_dataset("darcy", 8, 0, tmp_path / "x.npz")
    with pytest.raises(ValueError, match=r"tol must be a number in \(0, 1\)"):
        generate_dataset("darcy", 8, 2, tmp_path / "x.npz", tol=0.0)
    with pytest.raises(ValueError, match=r"tol must be a number in \(0, 1\) \(a relative residual\); got 2"):
        generate_dataset("darcy", 8, 2, tmp_path / "x.npz", tol=2)  # every solution 0, reported solved
    with pytest.raises(SystemExit):
        cli_main(["generate", "burgers", "--num", "2", "--out", str(tmp_path / "y.npz")])
    # A negative seed was checked after the parts directory was made (left empty).
    with pytest.raises(ValueError, match=r"seed must be an integer >= 0; got -1"):
        generate_dataset("darcy", 8, 2, tmp_path / "x.npz", seed=-1)
    with pytest.raises(TypeError, match="jacobi must be a bool; got 'yes'"):
        generate_dataset("darcy", 8, 2, tmp_path / "x.npz", jacobi="yes")
    assert not os.path.exists(tmp_path / "x.npz") and not os.path.exists(tmp_path / "x.npz.parts")


def test_numpy_integers_are_integers(tmp_path):
    """np.int64 grid / num / m / k / shard_size were refused ("must be an integer"), and an
    np.int64 seed failed in the JSON settings, after the parts directory was made."""
    small = dict(seed=np.int64(3), m=np.int64(20), k=np.int64(4), shard_size=np.int64(2))
    out = generate_dataset("poisson", np.int64(4), np.int64(2), tmp_path / "n.npz", **small)
    same = generate_dataset("poisson", 4, 2, tmp_path / "p.npz", seed=3, m=20, k=4, shard_size=2)
    with np.load(out) as got, np.load(same) as want:
        assert np.array_equal(got["solution"], want["solution"]) and str(got["settings"]) == str(want["settings"])


def test_unwritable_out_is_a_clean_error(tmp_path, capsys):
    # An --out whose directory cannot be created raised a FileNotFoundError traceback.
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert cli_main(["generate", "poisson", "--grid", "4", "--num", "2", "--out", str(blocker / "d" / "p.npz"),
                     "--quiet"]) == 1
    assert capsys.readouterr().err.startswith(f"lowrank-ops generate: --out {blocker / 'd' / 'p.npz'}: ")


def test_numpy_tolerance(tmp_path):
    np_tol = np.float32(1e-6)  # accepted as a number, written to the JSON settings as a float
    data = _load(generate_dataset("poisson", 6, 2, tmp_path / "p.npz", tol=np_tol, shard_size=2))
    assert json.loads(str(data["settings"]))["tol"] == float(np_tol)
