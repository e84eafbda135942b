"""The `fastddpm` command line: help, option mapping, and errors that say what to do."""
import glob
import os
import shutil
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


def _help(sub, capsys):
    with pytest.raises(SystemExit):
        cli.main([sub, "--help"])
    return capsys.readouterr().out


def test_demo_help_says_what_the_demo_runs(capsys):
    out = _help("demo", capsys)
    text = " ".join(out.split())
    for what in ("DDIM", "exponential moving average (EMA)", "--ema-decay", "samples.npy (the EMA weights' DDPM samples)",
                 "can dip below 0"):
        assert what in text, what
    # --n-steps sets the schedule's T: the DDPM chains run all of it, DDIM --ddim-steps of it.
    n_steps = _help_entries(out)["--n-steps"]
    assert "the DDPM chains sample all T, DDIM --ddim-steps of them" in n_steps, n_steps
    assert "sampling runs all of them" not in text


def test_bench_help_lists_every_provider(capsys):
    from fastddpm.cli.bench import cases

    text = " ".join(_help("bench", capsys).split())
    for what in ("DDPMScheduler", "DDIMScheduler", "(fastddpm-diffusers;", "(provider diffusers)", "DDIM step",
                 "DDIM loop"):
        assert what in text, what
    for name in cases.PROVIDERS:  # every provider is named, in the description or --providers
        assert name in text, name


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


@pytest.mark.parametrize("sub", ["demo", "bench"])
def test_a_device_torch_does_not_know_gets_a_short_message(sub, capsys, tmp_path, monkeypatch):
    pytest.importorskip("sklearn", reason="the demo needs scikit-learn")
    monkeypatch.chdir(tmp_path)
    assert cli.main([sub, "--device", "gpu"]) == 2
    err = capsys.readouterr().err
    assert err == f"fastddpm {sub}: error: --device 'gpu' is not a device: expected auto, cpu, cuda or cuda:N\n"


def test_demo_out_that_is_an_existing_file_says_so(capsys, tmp_path):
    pytest.importorskip("sklearn", reason="the demo needs scikit-learn")
    blocker = tmp_path / "taken"
    blocker.write_text("")
    assert cli.main(["demo", "--smoke", "--device", "cpu", "--out", str(blocker)]) == 2
    err = capsys.readouterr().err
    assert f"--out {blocker}: cannot create the output folder, it is a file" in err
    assert cli.main(["demo", "--smoke", "--device", "cpu", "--out", str(blocker / "sub")]) == 2
    assert f"cannot create the output folder, {blocker} is a file" in capsys.readouterr().err


def _help_entries(text):
    """{option: its help text, on one line} of an argparse help page."""
    entries, current = {}, None
    for line in text.splitlines():
        stripped = line.strip()
        if line.startswith("  -"):
            current = stripped.split()[0].rstrip(",")
            entries[current] = stripped
        elif current and line.startswith("    ") and stripped:
            entries[current] += " " + stripped
        else:
            current = None
    return entries


def test_demo_help_shows_each_default_once(capsys):
    from fastddpm.cli import demo

    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    entries = _help_entries(capsys.readouterr().out)
    d = demo.DemoConfig()
    expected = {"--steps": d.steps, "--batch-size": d.batch_size, "--n-steps": d.n_steps, "--width": d.width,
                "--lr": d.lr, "--sample-count": d.sample_count, "--burst-steps": d.burst_steps, "--seed": d.seed,
                "--device": d.device, "--backend": d.backend, "--out": d.out}
    for option, default in expected.items():
        assert entries[option].count("default") == 1, entries[option]
        assert f"(default {default}" in entries[option], entries[option]
    for option in ("--smoke", "--no-progress", "-h"):
        assert "default" not in entries[option], entries[option]
    for option, smoke in demo.SMOKE.items():
        assert f"{smoke} with --smoke" in entries["--" + option.replace("_", "-")]


# ---- .ci/setup.sh rebuilds the extension only when it is stale --------------------------------

def _extension_tree(tmp_path):
    """A tree shaped like the repository, with a copy of the built extension importable from it."""
    built = glob.glob(os.path.join(REPO, "fastddpm", "_C*.so"))
    if not built:
        pytest.skip("the compiled extension is not built in this checkout")
    root = tmp_path / "repo"
    (root / ".ci").mkdir(parents=True)
    shutil.copy(os.path.join(REPO, ".ci", "setup.sh"), root / ".ci" / "setup.sh")
    (root / "csrc" / "cpu").mkdir(parents=True)
    (root / "csrc" / "cpu" / "kernels.cpp").write_text("// source\n")
    (root / "setup.py").write_text("# build\n")
    (root / "fastddpm").mkdir()
    (root / "fastddpm" / "__init__.py").write_text("import torch\n")  # _C links against torch's libraries
    return root, built[0]


def _check_build(root, pythonpath):
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    env.pop("PYTHONPATH", None)
    if pythonpath:
        env["PYTHONPATH"] = str(pythonpath)
    proc = subprocess.run(["bash", str(root / ".ci" / "setup.sh"), "--check-build"], env=env,
                          capture_output=True, text=True, timeout=120)
    return proc.returncode


def test_setup_rebuilds_only_a_missing_stale_or_broken_extension(tmp_path):
    root, built = _extension_tree(tmp_path)
    assert _check_build(root, root) != 0, "no extension yet (a fresh clone): build it"
    so = root / "fastddpm" / os.path.basename(built)
    shutil.copy(built, so)
    now = os.stat(so).st_mtime
    for source in (root / "csrc" / "cpu" / "kernels.cpp", root / "setup.py"):
        os.utime(source, (now - 60, now - 60))
    assert _check_build(root, root) == 0, "newer than its sources and it imports: skip the build"
    assert _check_build(root, None) != 0, "fastddpm is imported from elsewhere: this tree is not installed"
    for source in (root / "csrc" / "cpu" / "kernels.cpp", root / "setup.py"):
        os.utime(source, (now + 60, now + 60))
        assert _check_build(root, root) != 0, f"{source.name} changed after the build: rebuild"
        os.utime(source, (now - 60, now - 60))
    assert _check_build(root, root) == 0
    so.write_bytes(b"not an ELF file")
    os.utime(so, (now + 120, now + 120))
    assert _check_build(root, root) != 0, "an extension that does not import: rebuild"
