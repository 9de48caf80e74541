"""What a person sees when a `lattice` command cannot run: one `lattice: error: ...` line on stderr naming the file,
argument or checkpoint, exit status 2, no Python traceback (unless LATTICE_DEBUG=1); and `lattice --help` lists every
command. Run as subprocesses, exactly as the console script runs."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lattice.cli import COMMANDS, error_line, is_user_error, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "configs", "quickstart.yaml")


def _lattice(tmp_path, *args: str, debug: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ, LATTICE_CACHE=str(tmp_path / "cache"))
    env.pop("LATTICE_DEBUG", None)
    if debug:
        env["LATTICE_DEBUG"] = "1"
    return subprocess.run([sys.executable, "-m", "lattice.cli", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=180)


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("lattice: error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


def test_help_lists_every_command(tmp_path):
    proc = _lattice(tmp_path, "--help")
    assert proc.returncode == 0, proc.stderr
    listed = [line.split()[0] for line in proc.stdout.splitlines() if line.startswith("  ")]
    assert listed == list(COMMANDS)
    assert {"fit", "validate", "test", "predict", "data", "filter", "partition"} <= set(listed)


def test_unknown_command(tmp_path):
    line = _one_error_line(_lattice(tmp_path, "frobnicate"))
    assert "unknown command 'frobnicate'" in line and "partition" in line


def test_bad_checkpoint_is_one_line(tmp_path):
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"PK\x03\x04 not really a checkpoint")
    line = _one_error_line(_lattice(tmp_path, "test", "--config", QUICKSTART, "--ckpt_path", str(corrupt)))
    assert "corrupt.ckpt" in line, line


@pytest.mark.parametrize("case", ["missing_config", "unknown_option", "missing_schema", "missing_ckpt", "corrupt_ckpt"])
def test_bad_input_is_one_line(tmp_path, monkeypatch, capsys, case):
    """The same handling in-process (main() is what the console script calls), for each kind of bad input."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LATTICE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LATTICE_DEBUG", raising=False)
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"PK\x03\x04 not really a checkpoint")
    args, expected = {
        "missing_config": (["fit", "--config", str(tmp_path / "nope.yaml")], "nope.yaml"),
        "unknown_option": (["fit", "--config", QUICKSTART, "--model.network.init_args.no_such_option=3"],
                           "no_such_option"),
        "missing_schema": (["fit", "--config", QUICKSTART, "--data.schema", str(tmp_path / "schema.yaml")],
                           str(tmp_path / "schema.yaml")),
        "missing_ckpt": (["validate", "--config", QUICKSTART, "--ckpt_path", str(tmp_path / "gone.ckpt")], "gone.ckpt"),
        "corrupt_ckpt": (["test", "--config", QUICKSTART, "--ckpt_path", str(corrupt)], "corrupt.ckpt"),
    }[case]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("lattice: error: ")]
    assert len(errors) == 1 and expected in errors[0], err[-3000:]


def test_lattice_debug_shows_the_traceback(tmp_path):
    proc = _lattice(tmp_path, "fit", "--config", str(tmp_path / "nope.yaml"), debug=True)
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_error_classification():
    assert is_user_error(ValueError("bad")) and is_user_error(FileNotFoundError(2, "No such file", "/x.parquet"))
    assert not is_user_error(RuntimeError("a bug")) and not is_user_error(KeyError("k"))
    assert error_line(FileNotFoundError(2, "No such file or directory", "/x.parquet")) == \
        "/x.parquet: No such file or directory"
    assert error_line(ValueError("first\n  second\n")) == "first second"


def test_lattice_own_commands_parse_errors_are_one_line(capsys, monkeypatch):
    monkeypatch.delenv("LATTICE_DEBUG", raising=False)
    for args, expected in ((["data", "generate", "--bogus"], "--bogus"), (["partition"], "partition.budget")):
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("lattice: error: ")]
        assert len(errors) == 1 and expected in errors[0] and "usage:" not in err, err
