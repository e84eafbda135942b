"""The `fastddpm` command line: help, option mapping, and errors that say what to do."""
import os
import subprocess
import sys

import pytest

from fastddpm import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_help_lists_both_subcommands(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "demo" in out and "bench" in out


@pytest.mark.parametrize("sub, options", [
    ("demo", ("--steps", "--batch-size", "--device", "--backend", "--seed", "--out", "--smoke")),
    ("bench", ("--quick", "--json", "--sizes", "--providers", "--device")),
])
def test_subcommand_help_documents_its_options(sub, options, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([sub, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for opt in options:
        assert opt in out, opt


def test_a_subcommand_is_required(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([])
    assert exc.value.code == 2
    assert "required" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["demo", "--steps", "0"], "must be >= 1, got 0"),
    (["demo", "--batch-size", "many"], "expected an integer, got 'many'"),
    (["demo", "--lr", "-3"], "must be > 0"),
    (["demo", "--backend", "fastest"], "invalid choice: 'fastest'"),
    (["bench", "--min-time", "0"], "must be > 0"),
])
def test_bad_arguments_exit_2_with_the_reason(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_demo_options_reach_the_config(monkeypatch, tmp_path):
    pytest.importorskip("sklearn", reason="the demo needs scikit-learn")
    pytest.importorskip("matplotlib", reason="the demo needs matplotlib")
    pytest.importorskip("tqdm", reason="the demo needs tqdm")
    from fastddpm.cli import demo

    seen = []
    monkeypatch.setattr(demo, "run", seen.append)
    assert cli.main(["demo", "--smoke", "--steps", "3", "--seed", "7", "--device", "cpu", "--backend", "reference",
                     "--out", str(tmp_path), "--no-progress"]) == 0
    cfg = seen[0]
    assert (cfg.steps, cfg.seed, cfg.device, cfg.backend, cfg.out, cfg.progress) == \
        (3, 7, "cpu", "reference", str(tmp_path), False)
    # --smoke fills what was not given explicitly
    assert (cfg.batch_size, cfg.n_steps, cfg.width) == \
        (demo.SMOKE["batch_size"], demo.SMOKE["n_steps"], demo.SMOKE["width"])
    assert cli.main(["demo"]) == 0
    assert seen[1] == demo.DemoConfig()  # no options: the documented defaults


@pytest.mark.parametrize("argv, message", [
    (["demo", "--smoke", "--device", "nonsense"], "--device 'nonsense' is not a device"),
    (["demo", "--smoke", "--device", "cpu", "--backend", "cuda"], "fastddpm backend 'cuda'"),
    (["bench", "--sizes", "cifar,huge"], "unknown size 'huge'"),
    (["bench", "--providers", "numpy"], "unknown provider 'numpy'"),
    (["bench", "--json", "/nonexistent-dir/bench.json"], "its folder does not exist"),
])
def test_errors_are_one_message_and_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    pytest.importorskip("sklearn", reason="the demo needs scikit-learn")
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.startswith(f"fastddpm {argv[0]}: error:")


def test_demo_out_that_is_a_file_is_a_clear_error(capsys, tmp_path):
    pytest.importorskip("sklearn", reason="the demo needs scikit-learn")
    blocker = tmp_path / "taken"
    blocker.write_text("")
    assert cli.main(["demo", "--smoke", "--device", "cpu", "--out", str(blocker / "sub")]) == 2
    assert "cannot create the output folder" in capsys.readouterr().err


def test_unavailable_backend_from_the_shell_has_a_hint_and_no_traceback(tmp_path):
    """`python -m fastddpm demo --backend cuda` on CPU: the registry's reason, a hint, exit 2."""
    env = dict(os.environ, PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-m", "fastddpm", "demo", "--device", "cpu", "--backend", "cuda",
                           "--out", str(tmp_path / "out")], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "fastddpm backend 'cuda'" in proc.stderr and "hint:" in proc.stderr
    assert not (tmp_path / "out" / "summary.json").exists()
