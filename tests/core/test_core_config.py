"""Config precedence: flag > TUB_* env > file > default; misspelt keys name the key and the file."""

import json

import pytest
import yaml

from tubcli.errors import TubError
from tubcli.testing import invoke


def resolved(result):
    assert result.exit_code == 0, result.output
    return yaml.safe_load(result.stdout)


def test_default_then_file_then_env_then_flag(toy_plugins, tmp_path):
    file = tmp_path / "train.yaml"
    file.write_text("epochs: 7\noptim:\n  lr: 0.5\nseed: 3\n")
    base = ["toy", "train", "--print-config"]
    assert resolved(invoke(base))["epochs"] == 5  # default
    cfg = resolved(invoke(base + ["-c", file]))
    assert (cfg["epochs"], cfg["optim"]["lr"], cfg["seed"]) == (7, 0.5, 3)  # file beats default
    env = {"TUB_TOY_EPOCHS": "9", "TUB_TOY_OPTIM__LR": "0.25", "TUB_SEED": "11"}
    cfg = resolved(invoke(base + ["-c", file], env=env))
    assert (cfg["epochs"], cfg["optim"]["lr"], cfg["seed"]) == (9, 0.25, 11)  # env beats file
    cfg = resolved(invoke(base + ["-c", file, "--epochs", "2", "--lr", "0.125", "--seed", "4"], env=env))
    assert (cfg["epochs"], cfg["optim"]["lr"], cfg["seed"]) == (2, 0.125, 4)  # flags beat env
    cfg = resolved(invoke(base + ["-c", file, "--set", "optim.lr=0.75", "--set", "note=x"], env=env))
    assert (cfg["optim"]["lr"], cfg["note"], cfg["epochs"]) == (0.75, "x", 9)


def test_flag_defaults_do_not_override_the_file(toy_plugins, tmp_path):
    file = tmp_path / "train.toml"
    file.write_text('epochs = 8\ndevice = "cpu"\n')
    cfg = resolved(invoke(["toy", "train", "-c", file, "--print-config"]))
    assert cfg["epochs"] == 8 and cfg["device"] == "cpu"
    as_json = invoke(["toy", "train", "-c", file, "--print-config", "--json"])  # printed YAML before
    assert json.loads(as_json.stdout) == cfg


def test_misspelt_key_names_key_and_file(toy_plugins, tmp_path):
    file = tmp_path / "bad.yaml"
    file.write_text("optim:\n  lerning_rate: 0.1\n")
    result = invoke(["toy", "train", "-c", file])
    assert result.exit_code == 2
    assert "optim.lerning_rate" in result.stderr and str(file) in result.stderr
    assert "known keys here: lr" in result.stderr  # nothing close: the keys of that section
    assert len(result.stderr.strip().splitlines()) == 1
    file.write_text("epoch: 3\n")
    result = invoke(["toy", "train", "-c", file])
    assert result.exit_code == 2 and "unknown config key 'epoch'" in result.stderr
    assert "did you mean 'epochs'?" in result.stderr


def test_a_boolean_is_not_read_as_a_number(tmp_path):
    """pydantic's lax mode would take `k: true` as k = 1; the error names where the value came from."""
    from tubcli.config import TubConfig, resolve_config

    class Cfg(TubConfig):
        k: int = 3
        lr: float | None = None
        ks: list[int] = []

    conf = tmp_path / "b.yaml"
    conf.write_text("ks: [true, 2]\n")
    for kwargs, source in ((dict(sets=["k=true"]), "--set"), (dict(sets=["lr=no"]), "--set"),
                           (dict(environ={"TUB_TOY_K": "on"}), "TUB_TOY_K"), (dict(file=conf), str(conf))):
        with pytest.raises(TubError, match=f"from {source}\\): true/false where a number is expected"):
            resolve_config(Cfg, "toy", **{"environ": {}, **kwargs})


def test_misspelt_set_and_bad_value(toy_plugins):
    result = invoke(["toy", "train", "--set", "epoch=3", "--print-config"])
    assert result.exit_code == 2 and "'epoch'" in result.stderr and "--set" in result.stderr
    result = invoke(["toy", "train", "--set", "epochs=many", "--print-config"])
    assert result.exit_code == 2 and "epochs" in result.stderr
    result = invoke(["toy", "train", "--precision", "fp8", "--print-config"])
    assert result.exit_code == 2 and "precision" in result.stderr


def test_config_command_validates(toy_plugins, tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("epochs: 4\n")
    result = invoke(["config", "toy", "train", "-c", good])
    assert result.exit_code == 0 and yaml.safe_load(result.stdout)["epochs"] == 4
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochz: 4\n")
    result = invoke(["config", "toy", "train", "-c", bad])
    assert result.exit_code == 2 and "epochz" in result.stderr
    result = invoke(["config", "toy", "nope"])
    assert result.exit_code == 2 and "train" in result.stderr


def test_config_file_that_is_binary_or_a_directory_is_a_one_line_error(tmp_path):
    from tubcli.config import read_config_file

    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(TubError, match="is not UTF-8 text"):
        read_config_file(binary)
    with pytest.raises(TubError, match="is a directory"):
        read_config_file(tmp_path)
    bom = tmp_path / "bom.yaml"
    bom.write_text("seed: 3\n", encoding="utf-8-sig")  # Windows editors' UTF-8 with a byte-order mark
    assert read_config_file(bom) == {"seed": 3}


def test_a_bad_list_item_names_the_layer_it_came_from():
    from typing import Literal

    from pydantic import BaseModel

    from tubcli.config import resolve_config

    class Cfg(BaseModel):
        metrics: list[Literal["ri", "cs"]] = ["ri"]

    with pytest.raises(TubError, match=r"'metrics.1' \(from command-line flags\)"):
        resolve_config(Cfg, "toy", flags={"metrics": ["ri", "foo"]}, environ={})


def test_a_bad_value_from_the_environment_names_its_variable():
    from pydantic import BaseModel

    from tubcli.config import TubConfig, resolve_config

    class Inner(BaseModel):
        k: int = 3

    class Cfg(TubConfig):
        inner: Inner = Inner()
        lr: float = 0.1

    with pytest.raises(TubError, match=r"'inner.k' \(from TUB_TOY_INNER__K\)"):
        resolve_config(Cfg, "toy", environ={"TUB_TOY_INNER__K": "many"})
    with pytest.raises(TubError, match=r"'seed' \(from TUB_SEED\)"):
        resolve_config(Cfg, "toy", environ={"TUB_SEED": "x"})
    with pytest.raises(TubError, match=r"'seed' \(from TUB_TOY_SEED\)"):  # the plugin's own wins
        resolve_config(Cfg, "toy", environ={"TUB_SEED": "1", "TUB_TOY_SEED": "x"})
    with pytest.raises(TubError, match=r"'lr' \(from TUB_TOY_LR\): nan is not a finite number"):
        resolve_config(Cfg, "toy", environ={"TUB_TOY_LR": "nan"})


def test_set_values_for_text_fields_stay_text():
    from typing import Literal, Optional

    from pydantic import BaseModel

    from tubcli.config import resolve_config

    class Inner(BaseModel):
        column: Optional[str] = None

    class Cfg(BaseModel):
        target: str = "y"
        mode: Literal["on", "off"] = "off"
        k: int = 3
        inner: Inner = Inner()

    cfg = resolve_config(Cfg, "toy", sets=["target=2020", "mode=on", "k=5", "inner.column=yes"], environ={})
    assert (cfg.target, cfg.mode, cfg.k, cfg.inner.column) == ("2020", "on", 5, "yes")
    cfg = resolve_config(Cfg, "toy", environ={"TUB_TOY_TARGET": "1e3"})
    assert cfg.target == "1e3"


def test_a_file_may_give_a_one_item_list_as_its_item_but_no_number_as_text(tmp_path):
    """`model: m.safetensors` and `x: 2` are lists of one, as with the flags; `target: 0017` in YAML is the
    octal number 15 and `2020.10` the float 2020.1, so a number where text is expected is refused (with
    the quotes to add) rather than turned into other text; --set and TUB_* keep the text as typed."""
    from pathlib import Path
    from typing import Optional

    from tubcli.config import TubConfig, resolve_config

    class Cfg(TubConfig):
        target: Optional[str] = None
        model: list[Path] = []
        x: list[int] = []
        k: int = 3

    conf = tmp_path / "c.yaml"
    conf.write_text("model: m.safetensors\nx: 2\nk: 5\n")
    cfg = resolve_config(Cfg, "toy", file=conf, environ={})
    assert (cfg.model, cfg.x, cfg.k) == ([Path("m.safetensors")], [2], 5)
    assert resolve_config(Cfg, "toy", environ={"TUB_TOY_MODEL": "a.pt"}).model == [Path("a.pt")]
    assert resolve_config(Cfg, "toy", sets=["model=b.pt", "x=3"], environ={}).x == [3]
    for text in ("target: 0017\n", "target: 2020.10\n"):
        conf.write_text(text)
        with pytest.raises(TubError, match=r"'target' \(from .*c.yaml\): a number where text is expected; quote it"):
            resolve_config(Cfg, "toy", file=conf, environ={})
    conf.write_text("target: '0017'\n")
    assert resolve_config(Cfg, "toy", file=conf, environ={}).target == "0017"
    assert resolve_config(Cfg, "toy", sets=["target=0017"], environ={}).target == "0017"
    assert resolve_config(Cfg, "toy", environ={"TUB_TOY_TARGET": "0017"}).target == "0017"


def test_upper_case_fields_have_an_environment_spelling():
    """Each part of TUB_<PLUGIN>_<FIELD> matches a field of the same spelling first, else the one field
    equal up to case: TUB_X_C sets C; with fields k and K (pathorob), _K sets K and _k sets k."""
    from tubcli.config import TubConfig, resolve_config, unknown_env_vars

    class Cfg(TubConfig):
        C: float = 1.0
        k: int = 5
        K: int | None = None
        epochs: int = 1

    cfg = resolve_config(Cfg, "toy", environ={"TUB_TOY_C": "10", "TUB_TOY_K": "7", "TUB_TOY_EPOCHS": "3"})
    assert (cfg.C, cfg.K, cfg.k, cfg.epochs) == (10.0, 7, 5, 3)
    assert resolve_config(Cfg, "toy", environ={"TUB_TOY_k": "9"}).k == 9
    assert unknown_env_vars([Cfg], "toy", {"TUB_TOY_C": "1", "TUB_TOY_K": "1", "TUB_TOY_CC": "1"}) == ["TUB_TOY_CC"]
    with pytest.raises(TubError, match=r"'C' \(from TUB_TOY_C\)"):
        resolve_config(Cfg, "toy", environ={"TUB_TOY_C": "big"})

    class Neighbours(TubConfig):  # another verb of the plugin has only the lower-case k (pathorob's ri) ...
        k: int = 5

    class Clusters(TubConfig):  # ... and another only the upper-case K (clustering)
        K: int | None = None

    verbs = [Cfg, Neighbours, Clusters]
    env = {"TUB_TOY_K": "7", "TUB_TOY_k": "9"}  # each names its own field, in every verb
    assert resolve_config(Neighbours, "toy", environ=env, siblings=verbs).k == 9
    assert resolve_config(Neighbours, "toy", environ={"TUB_TOY_K": "7"}, siblings=verbs).k == 5
    assert resolve_config(Clusters, "toy", environ={"TUB_TOY_k": "9"}, siblings=verbs).K is None
    assert resolve_config(Clusters, "toy", environ=env, siblings=verbs).K == 7


def test_a_config_file_suffix_is_read_in_any_case(tmp_path):
    from tubcli.config import read_config_file

    (tmp_path / "c.TOML").write_text("k = 3\n[inner]\nx = 1\n")
    (tmp_path / "c.JSON").write_text('{"k": 4}')
    assert read_config_file(tmp_path / "c.TOML") == {"k": 3, "inner": {"x": 1}}
    assert read_config_file(tmp_path / "c.JSON") == {"k": 4}


def test_tub_config_rejects_an_unknown_device_as_the_verb_would(toy_plugins):
    result = invoke(["config", "toy", "train", "--set", "device=tpu"])
    assert result.exit_code == 2
    assert "'device' (from --set): unknown device 'tpu'; use auto, cpu, cuda, cuda:N or mps" in result.stderr


def test_a_misspelt_plugin_variable_is_named_not_ignored(toy_plugins, tmp_path):
    data = tmp_path / "d.csv"
    data.write_text("1,0,2\n0,1,3\n")
    env = {"TUB_TOY_EPOCS": "9", "TUB_TOY_WEIGHTS": "w.pt"}  # a typo; a setting of another verb (explain)
    result = invoke(["toy", "train", data, "--epochs", "1", "-o", tmp_path / "r"], env=env)
    assert result.exit_code == 0, result.output
    assert "TUB_TOY_EPOCS names no setting of 'tub toy'" in result.stderr
    assert "TUB_TOY_WEIGHTS" not in result.stderr
    for checking in (["toy", "train", data, "--print-config"], ["config", "toy", "train"]):  # where one looks
        result = invoke(checking, env=env)
        assert result.exit_code == 0 and "warning: TUB_TOY_EPOCS names no setting" in result.stderr, result.stderr
        assert "TUB_TOY_WEIGHTS" not in result.stderr and "epochs" in result.stdout


def test_a_runs_config_yaml_reruns_it_from_another_folder(toy_plugins, tmp_path, monkeypatch):
    """Relative paths in a run's config.yaml are relative to where the run started (env.json's cwd); from
    elsewhere `-c run/config.yaml` failed (no such file) or could read another file of the same name."""
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "data" / "d.csv").write_text("1,0,2\n0,1,3\n")
    monkeypatch.chdir(project)
    assert invoke(["toy", "train", "data/d.csv", "--epochs", "2", "-o", "run"]).exit_code == 0
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "data").mkdir(parents=True)
    (elsewhere / "data" / "d.csv").write_text("5,5,5\n")  # same relative name, other data
    monkeypatch.chdir(elsewhere)
    cfg = resolved(invoke(["toy", "train", "-c", project / "run" / "config.yaml", "--print-config"]))
    assert cfg["data"] == str(project / "data" / "d.csv")
    mine = elsewhere / "mine.yaml"  # a user's own config file: its paths are read from here, as written
    mine.write_text("data: data/d.csv\n")
    assert resolved(invoke(["toy", "train", "-c", mine, "--print-config"]))["data"] == "data/d.csv"


def test_a_list_of_text_takes_a_yaml_list_from_set_and_env():
    """`--set covariates=[a, b]` kept the literal text '[a, b]' for a list[str] field (QA configrt), while a
    str field still keeps text that YAML would read otherwise."""
    from pydantic import BaseModel

    from tubcli.config import typed_value

    class Cfg(BaseModel):
        names: list[str] = []
        target: str = ""

    assert typed_value(Cfg, "names", "[a, b]") == ["a", "b"]
    assert typed_value(Cfg, "target", "2020") == "2020" and typed_value(Cfg, "target", "[a]") == "[a]"


def test_config_files_refuse_repeated_keys_and_yaml_errors_say_where(tmp_path):
    """A key given twice silently took the last value in YAML and JSON (TOML refuses it); YAML's error
    position was cut off with the rest of its message."""
    from tubcli.config import read_config_file

    for name, text in [("d.yaml", "epochs: 5\nlr: 0.1\nepochs: 200\n"), ("n.yaml", "optim:\n  lr: 1\n  lr: 2\n"),
                       ("d.json", '{"epochs": 5, "epochs": 7}')]:
        (tmp_path / name).write_text(text)
        with pytest.raises(TubError, match="the key '(epochs|lr)' is given twice"):
            read_config_file(tmp_path / name)
    (tmp_path / "merge.yaml").write_text("base: &b {lr: 1, wd: 0}\noptim:\n  <<: *b\n  lr: 2\n")  # an override
    assert read_config_file(tmp_path / "merge.yaml")["optim"] == {"lr": 2, "wd": 0}
    (tmp_path / "indent.yaml").write_text("seed: 1\nexplain:\n  rule: gi\n   eta: 0.5\n")
    with pytest.raises(TubError, match=r"mapping values are not allowed here \(line 4, column 7\)"):
        read_config_file(tmp_path / "indent.yaml")


def test_help_names_the_config_key_of_a_flag_spelt_otherwise(toy_plugins):
    result = invoke(["toy", "train", "--help"], env={"COLUMNS": "200"})
    text = " ".join(result.stdout.replace("│", " ").split())
    assert "learning rate (config default: 0.1) (config key: optim.lr)" in text
    assert "(config key: epochs)" not in text  # --epochs sets epochs
