"""The root commands, plugin isolation, devices, errors and a fast --help."""

import json
import os
import subprocess
import sys
from typing import Literal

import pytest

from tubcli.testing import check_plugin, expect_error_line, invoke


def test_broken_plugin_is_listed_and_others_work(toy_plugins, tmp_path):
    result = invoke(["plugins", "--json"])
    assert result.exit_code == 0
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert "nonexistent_dependency" in rows["broken"]["error"]
    assert rows["toy"]["error"] is None and {"train", "evaluate", "explain"} <= set(rows["toy"]["verbs"])
    result = invoke(["broken", "anything"])
    assert result.exit_code == 1 and "failed to load" in result.stderr
    data = tmp_path / "d.csv"
    data.write_text("1,0,2\n0,1,3\n")
    result = invoke(["toy", "train", str(data), "--epochs", "1", "-o", tmp_path / "r"])
    assert result.exit_code == 0, result.output


def test_strict_plugins_makes_load_failures_fatal(toy_env, tmp_path):
    code = ("import sys; from importlib.metadata import EntryPoint\n"
            "from tubcli.plugins import Plugins, reset_plugins\n"
            "p = Plugins(use_entry_points=False)\n"
            "p.load_entry_point(EntryPoint(name='broken', value='tub_broken.plugin', group='tub'))\n"
            "reset_plugins(p)\nfrom tubcli.cli import main\nmain(['plugins'])\n")
    ok = subprocess.run([sys.executable, "-c", code], env=toy_env, capture_output=True, text=True)
    assert ok.returncode == 0 and "broken" in ok.stdout
    strict = subprocess.run([sys.executable, "-c", code], env={**toy_env, "TUB_STRICT_PLUGINS": "1"},
                            capture_output=True, text=True)
    assert strict.returncode == 1 and "broken" in strict.stderr


def test_doctor_reports_requirements(toy_plugins):
    result = invoke(["doctor", "--json"])
    report = json.loads(result.stdout)
    toy = next(p for p in report["plugins"] if p["name"] == "toy")
    assert toy["requires"]["numpy"]["found"] is True
    missing = toy["optional"]["nonexistent_optional_pkg"]
    assert missing["found"] is False and "pip install" in missing["hint"]
    assert report["torch"]["version"]
    assert "library" in report["openslide"] or "error" in report["openslide"]
    assert result.exit_code == 1  # the broken plugin makes the environment not ok


def test_absent_device_is_a_clear_error(toy_plugins, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    data = tmp_path / "d.csv"
    data.write_text("1,0,2\n")
    result = invoke(["toy", "train", str(data), "--device", "cuda", "-o", tmp_path / "r"])
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: --device cuda: CUDA is not available here; use --device cpu or auto"
    result = invoke(["toy", "train", str(data), "--device", "tpu", "-o", tmp_path / "r2"])
    assert result.exit_code == 2 and "unknown device" in result.stderr


def test_missing_input_is_one_line_exit_2(toy_plugins, tmp_path):
    result = invoke(["toy", "train", str(tmp_path / "nope.csv"), "-o", tmp_path / "r"])
    assert result.exit_code == 2 and "does not exist" in result.stderr
    assert "Traceback" not in result.output and not (tmp_path / "r" / "DONE").exists()


def test_unexpected_exception_is_one_line_unless_traceback(toy_plugins, tmp_path):
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"not safetensors")
    result = invoke(["toy", "explain", str(weights), "-o", tmp_path / "r"])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1


def test_results_on_stdout_logs_on_stderr(toy_plugins, tmp_path):
    data = tmp_path / "d.csv"
    data.write_text("1,0,2\n0,1,3\n")
    result = invoke(["toy", "train", str(data), "--epochs", "3", "--json", "-o", tmp_path / "r"])
    assert result.exit_code == 0
    metrics = json.loads(result.stdout)
    assert metrics["epochs"] == 3
    run = tmp_path / "r"
    for name in ("config.yaml", "env.json", "metrics.json", "metrics.jsonl", "tub.log", "DONE",
                 "checkpoints/last.pt", "checkpoints/model.safetensors", "checkpoints/model.json"):
        assert (run / name).exists(), name
    assert json.loads((run / "metrics.json").read_text()) == metrics
    assert json.loads((run / "env.json").read_text())["argv"]


def test_default_run_directory_layout(toy_plugins, tmp_path):
    data = tmp_path / "d.csv"
    data.write_text("1,0,2\n")
    assert invoke(["toy", "train", str(data), "--epochs", "1"]).exit_code == 0
    runs = list((tmp_path / "runs" / "toy" / "train").iterdir())
    assert len(runs) == 1 and len(runs[0].name.split("_")[-1]) == 8 and (runs[0] / "DONE").exists()


def test_demo_runs_into_one_directory(toy_plugins, tmp_path):
    result = invoke(["demo", "toy", "-o", tmp_path / "demo", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert rows[0]["plugin"] == "toy" and rows[0]["status"] == "ok" and rows[0]["figures"]["loss"] < 1.0
    assert (tmp_path / "demo" / "toy" / "DONE").exists()
    assert invoke(["demo", "nope"]).exit_code == 2
    result = invoke(["demo", "toy", "-o", tmp_path / "demo" / "toy"])  # a verb's run directory is not a demo folder
    assert result.exit_code == 2 and "run directory of another verb" in result.stderr
    assert not (tmp_path / "demo" / "toy" / "toy").exists()


@pytest.mark.parametrize("fmt", ["pdf", "svg"])
def test_vector_figures_beside_each_png_plot(toy_plugins, tmp_path, fmt):
    """TUB_VECTOR_FIGURES (or --set vector_figures) adds a vector copy of every plot for papers: TrueType fonts
    in the PDF (Type 3 glyphs are refused by journals' tools), text kept as text in the SVG; PNG only by default."""
    out = tmp_path / fmt
    assert invoke(["demo", "toy", "-o", out], env={"TUB_VECTOR_FIGURES": fmt}).exit_code == 0
    png, vector = out / "toy" / "outputs" / "loss.png", out / "toy" / "outputs" / f"loss.{fmt}"
    assert png.stat().st_size > 0
    data = vector.read_bytes()
    assert (data.startswith(b"%PDF") and b"/FontFile2" in data) if fmt == "pdf" else b">epoch</text>" in data
    assert invoke(["demo", "toy", "-o", tmp_path / "plain"]).exit_code == 0
    assert sorted(p.name for p in (tmp_path / "plain" / "toy" / "outputs").glob("loss.*")) == ["loss.png"]
    line = expect_error_line(invoke(["demo", "toy", "-o", tmp_path / "bad"], env={"TUB_VECTOR_FIGURES": "eps"}),
                             "vector_figures", "'pdf' or 'svg'")
    assert not (tmp_path / "bad").exists(), line


def test_patch_encoders_hook(toy_plugins):
    import torch

    from tubcli.plugins import get_patch_encoder, patch_encoders

    assert "toy-mean" in patch_encoders()
    encoder = get_patch_encoder("toy-mean").load(None, "cpu", torch.float32)
    assert encoder(torch.ones(2, 3, 8, 8)).shape == (2, 3)
    from tubcli.errors import TubError

    with pytest.raises(TubError, match="toy-mean"):
        get_patch_encoder("atlas-nonexistent")


def test_demo_names_a_failure_in_full_and_an_absent_device_once(toy_plugins, tmp_path, monkeypatch):
    monkeypatch.setenv("TOY_DEMO_FAILS", "1")
    result = invoke(["demo", "toy", "-o", tmp_path / "d"])
    assert result.exit_code == 1
    row = next(ln for ln in result.stdout.splitlines() if ln.startswith("toy "))
    assert row.split()[1] == "failed" and row.endswith("with a reason longer than sixty characters to show")
    import torch

    if not torch.cuda.is_available():
        line = expect_error_line(invoke(["demo", "toy", "-o", tmp_path / "c", "--device", "cuda"]), "cuda")
        assert not (tmp_path / "c").exists(), line


def test_check_plugin_on_toy(toy_plugins):
    check_plugin("toy", subprocess_checks=False)


def test_the_callers_variables_do_not_reach_the_checks(toy_plugins, monkeypatch):
    """Inside an array job or with TUB_DEVICE=cuda exported, a plugin's tests ran other settings (and the
    missing-input check passed on the device error's exit 2)."""
    from tubcli.testing import caller_variables, isolate_environment

    for key, value in {"TUB_DEVICE": "cuda", "SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2",
                       "WORLD_SIZE": "2", "TUB_TOY_EPOCHS": "9"}.items():
        monkeypatch.setenv(key, value)
    assert sorted(caller_variables()) == ["SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_ID", "TUB_DEVICE",
                                          "TUB_TOY_EPOCHS", "WORLD_SIZE"]
    check_plugin("toy", subprocess_checks=False)  # the suite itself runs in a clean environment
    isolate_environment(monkeypatch)
    assert caller_variables() == [] and os.environ["TUB_NO_PROGRESS"] == "1"


def test_help_imports_no_torch():
    code = ("import sys\nfrom tubcli.cli import main\n"
            "for argv in (['--help'], ['plugins']):\n"
            "    try:\n        main(argv)\n    except SystemExit as e:\n        assert e.code in (0, None)\n"
            "assert 'torch' not in sys.modules\nassert 'numpy' not in sys.modules\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "TUB_NO_PROGRESS": "1"})
    assert proc.returncode == 0, proc.stderr


def test_root_help_is_plain_and_whole():
    """`tub --help` draws no rich panels (importing rich alone costs 0.15 s of its half-second budget) and
    gives each command's whole first paragraph, not click's 45-character cut."""
    code = ("import sys\nfrom tubcli.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code in (0, None)\n"
            "assert not [m for m in sys.modules if m.split('.')[0] in ('rich', 'markdown_it')]\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "TUB_NO_PROGRESS": "1", "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    assert "Check versions, plugin requirements, torch/CUDA/MPS and the OpenSlide library." in text
    assert "..." not in text.split("Commands:")[1]


def test_installed_plugins_load():
    """Every plugin installed in this environment loads (CI also runs with TUB_STRICT_PLUGINS=1)."""
    from tubcli.plugins import Plugins

    errors = {r.name: r.error for r in Plugins().records.values() if r.error}
    assert not errors


def test_square_brackets_in_field_descriptions_survive_the_help(toy_plugins):
    result = invoke(["toy", "train", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "epochs [one pass over the data each]" in result.stdout


@pytest.mark.parametrize("args", [["plugins"], ["doctor"], ["toy", "train", "--help"], ["--help"],
                                  ["toy", "train", "--print-config"]])
def test_core_commands_into_a_closed_pipe_exit_0(toy_env, args):
    """`tub plugins | head -1` under `set -o pipefail`: the early reader is not an error (the verbs agree)."""
    proc = subprocess.Popen([sys.executable, "-m", "tub_toy.run_cli", *args], env=toy_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the output comes
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize("args, says", [
    (["toy", "train", "--bogus"], "error: no such option --bogus; see 'tub toy train --help'"),
    (["toy", "train", "--epoch", "2"], "error: no such option --epoch (did you mean '--epochs'?)"),
    (["toy", "train", "--epochs", "many"], "error: invalid value for '--epochs'"),
    (["nosuch"], "error: no such command 'nosuch'; see 'tub --help'"),
    (["toy", "trian"], "error: no such command 'trian' (did you mean 'train'?); see 'tub toy --help'"),
])
def test_usage_errors_are_one_line_as_every_other_error(toy_env, args, says):
    """A mistyped option was a boxed panel (box-drawing characters in a batch job's log) of five lines; the
    suggestions are the close names (click's matched every option by its dashes, a lazy verb by none)."""
    proc = subprocess.run([sys.executable, "-m", "tub_toy.run_cli", *args], env=toy_env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith(says), proc.stderr
    assert "╭" not in proc.stderr


@pytest.mark.parametrize("args, usage", [([], "Usage: tub [OPTIONS] COMMAND"), (["toy"], "Usage: tub toy")])
def test_the_bare_command_prints_its_help(toy_env, args, usage):
    proc = subprocess.run([sys.executable, "-m", "tub_toy.run_cli", *args], env=toy_env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout.startswith(usage) and proc.stderr == ""
    assert "Commands:" in proc.stdout if not args else "Verbs:" in proc.stdout


def test_a_full_disk_is_a_one_line_error(toy_env):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-m", "tub_toy.run_cli", "plugins"], env=toy_env, stdout=full,
                              stderr=subprocess.PIPE, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == \
        ["error: cannot write the output: No space left on device"]


def test_a_full_stdout_is_named_and_not_blamed_on_the_run_directory(toy_env, tmp_path):
    """`tub ... > out.txt` on a full disk told the user to give -o another file system; the run directory
    was fine, stdout was not."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    item = tmp_path / "item.txt"
    item.write_text("3")
    runs = [(["toy", "train", "--print-config"], "error: cannot write the config to stdout: No space left on device"),
            (["toy", "evaluate", str(item), "-o", str(tmp_path / "r"), "-q"],
             "error: cannot write the results to stdout: No space left on device; the run directory has them: ")]
    for args, says in runs:
        with open("/dev/full", "w") as full:
            proc = subprocess.run([sys.executable, "-m", "tub_toy.run_cli", *args], env=toy_env, stdout=full,
                                  stderr=subprocess.PIPE, text=True, timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(says), proc.stderr


def test_help_lists_a_literal_field_choices_and_a_list_default():
    from pydantic import BaseModel, Field

    from tubcli.verbs import _describe

    class Cfg(BaseModel):
        method: list[Literal["lrp", "ig"]] = Field(default_factory=lambda: ["lrp"], description="method(s)")
        ensemble: Literal["nve", "npt"] = Field("nve", description="ensemble")

    assert _describe(Cfg.model_fields["method"]) == "method(s) (one of lrp, ig) (config default: lrp)"
    assert _describe(Cfg.model_fields["ensemble"]) == "ensemble (one of nve, npt) (config default: nve)"


def test_a_device_error_names_the_variable_that_asked_for_it(monkeypatch):
    """The user may not have typed --device: the error says where the device came from (not another plugin's)."""
    from tubcli.config import TubConfig, resolve_config
    from tubcli.device import _origin

    monkeypatch.setenv("TUB_ATLAS_DEVICE", "cuda")  # another plugin's variable
    resolve_config(TubConfig, "knnlrp", flags={"device": "cuda"})
    assert _origin() == ""
    monkeypatch.setenv("TUB_DEVICE", "cuda")
    resolve_config(TubConfig, "knnlrp")
    assert _origin() == " (from TUB_DEVICE)"
    monkeypatch.setenv("TUB_KNNLRP_DEVICE", "cuda")
    resolve_config(TubConfig, "knnlrp")
    assert _origin() == " (from TUB_KNNLRP_DEVICE)"


def test_demo_without_o_goes_under_tub_runs_dir(toy_plugins, tmp_path, monkeypatch):
    """The README says TUB_RUNS_DIR sets where default run directories go; the demo wrote ./runs/demo."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TUB_RUNS_DIR", str(tmp_path / "elsewhere"))
    assert invoke(["demo", "toy"]).exit_code == 0
    assert not (tmp_path / "runs").exists() and list((tmp_path / "elsewhere" / "demo").glob("*/toy/DONE"))


def test_a_few_records_in_the_results_table_are_rows_not_a_python_repr():
    from tubcli.verbs import flatten, format_value

    rows = flatten({"linear": {"runs": [{"seed": 0, "acc": 0.5}, {"seed": 1, "acc": 0.75}]}, "n": 2})
    assert rows == [("linear.runs.0.seed", 0), ("linear.runs.0.acc", 0.5), ("linear.runs.1.seed", 1),
                    ("linear.runs.1.acc", 0.75), ("n", 2)]
    assert format_value([1.0] * 9) == "[9 values]"


@pytest.fixture
def no_plugins(monkeypatch, tmp_path):
    from tubcli.plugins import Plugins, reset_plugins

    previous = reset_plugins(Plugins(use_entry_points=False))
    monkeypatch.chdir(tmp_path)
    yield
    reset_plugins(previous)


def test_a_core_without_plugins_refuses_demo_and_without_torch_is_healthy(no_plugins, monkeypatch, tmp_path):
    result = invoke(["demo"])
    assert result.exit_code == 2 and "no installed plugin has a demo" in result.stderr
    assert not (tmp_path / "runs").exists()  # no run directory was promised or made
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` fails: a core-only install
    report = json.loads(invoke(["doctor", "--json"]).stdout)
    assert report["torch"] is None and report["ok"] is True  # torch matters only to plugins that require it


def test_version_lists_tub_and_each_plugin(toy_plugins):
    result = invoke(["--version"])
    lines = result.stdout.splitlines()
    assert result.exit_code == 0 and lines[0].startswith("tub ") and any(line.startswith("toy ") for line in lines)


def test_file_system_refusals_are_one_line_without_tubs_own_file_names():
    """-o /proc/x failed with "No such file or directory: '/proc/..x.claim.lock.13120'": an internal name."""
    import errno

    from tubcli.verbs import os_error_hint

    hint = os_error_hint(FileNotFoundError(errno.ENOENT, "No such file or directory", "/proc/..tubx.claim.lock.13120"))
    assert hint.startswith("cannot create files in /proc ") and "claim" not in hint
    assert os_error_hint(FileNotFoundError(errno.ENOENT, "No such file or directory", "/data/in.csv")) is None
    hint = os_error_hint(PermissionError(errno.EACCES, "Permission denied", "/ro/out.safetensors"))
    assert "permission denied: /ro/out.safetensors" in hint and "an OUTPUT you named" in hint


def test_doctor_calls_nothing_optional_that_a_plugin_requires():
    """pathorob's doctor listed matplotlib and pillow as optional while its pyproject requires them: one
    of the two was wrong about what an install holds."""
    import re
    import tomllib
    from pathlib import Path

    from tubcli.plugins import get_plugins

    import_name = {"scikit-learn": "sklearn", "pillow": "PIL", "openslide-python": "openslide"}
    root = Path(__file__).resolve().parents[2]
    for app in get_plugins().apps.values():
        pyproject = root / "plugins" / f"tub-{app.name}" / "pyproject.toml"
        if not pyproject.is_file():
            continue
        deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
        names = {re.split(r"[<>=!\[ ;]", d, maxsplit=1)[0].strip().lower() for d in deps}
        required = {import_name.get(n, n) for n in names}
        assert not required & set(app.optional), (app.name, required & set(app.optional))


def test_denormals_flushed_holds_inside_the_block_only_and_restores_the_callers_mode():
    """Flushing subnormals speeds up the mlff model on a CPU, but is process state that other C code may not
    expect: inside the block only, and a caller's own choice is put back either way."""
    import torch

    from tubcli.device import denormals_flushed

    def flushing():
        return torch.tensor([1e-40], dtype=torch.float32).mul(1.0).item() == 0.0

    assert not flushing()
    try:
        with denormals_flushed():
            assert flushing()
            with denormals_flushed(False):
                assert not flushing()
            assert flushing()
        assert not flushing()
        torch.set_flush_denormal(True)  # a caller who flushes keeps flushing after a block that turned it off
        with denormals_flushed(False):
            assert not flushing()
        assert flushing()
        with pytest.raises(ValueError), denormals_flushed(False):
            raise ValueError
        assert flushing()
    finally:
        torch.set_flush_denormal(False)


def test_a_read_only_home_gives_matplotlib_a_private_folder_without_its_warning(tmp_path, monkeypatch):
    """With a read-only HOME (containers, compute nodes) every plotting verb printed matplotlib's two-line
    cache warning, under -q too."""
    from tubcli.cli import _private_matplotlib_dir_if_home_is_read_only as private_dir

    home = tmp_path / "home"
    home.mkdir()
    for var in ("MPLCONFIGDIR", "XDG_CONFIG_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(home))
    private_dir()
    assert "MPLCONFIGDIR" not in os.environ  # a writable home is matplotlib's business
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: not str(p).startswith(str(home)) and real_access(p, mode))
    private_dir()
    private = os.environ["MPLCONFIGDIR"]
    assert os.path.isdir(private) and not private.startswith(str(home))
    os.rmdir(private)


def test_demo_stopped_by_sigterm_says_so_and_marks_its_run(toy_env, tmp_path):
    """`tub demo` died silently at a batch system's time limit (exit 143, no line, a half-made run directory
    whose tub.log ended as a run still going): it now stops as the verbs do."""
    import signal
    import time

    out = tmp_path / "demo"
    proc = subprocess.Popen([sys.executable, "-m", "tub_toy.run_cli", "demo", "-o", str(out)],
                            env={**toy_env, "TOY_DEMO_WAITS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline and not (out / "toy" / "started").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stderr = proc.communicate(timeout=60)[1].decode()
    assert proc.returncode == 143
    assert stderr.strip().splitlines()[-1].startswith("error: terminated (SIGTERM) during the toy demo; rerun")
    assert not (out / "toy").exists()  # it had no outputs yet: no half-made run directory is left
