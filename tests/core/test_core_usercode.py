"""A user's own function named in a setting (FILE.py:NAME or MODULE:NAME), with one-line errors."""

import pytest

from tubcli.errors import TubError
from tubcli.usercode import load_user_function


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "targets.py").write_text("def log_prob(x):\n    return -0.5 * x * x\n\nVALUE = 3\n")
    (tmp_path / "broken.py").write_text("import math\nx = 1 / 0\n")
    (tmp_path / "needs.py").write_text("import a_package_nobody_has\n")
    return tmp_path


def test_a_file_and_a_module_of_the_working_folder_give_the_function_and_its_file(folder):
    func, source = load_user_function("targets.py:log_prob")
    assert func(2.0) == -2.0 and source == folder / "targets.py"
    func, source = load_user_function("targets:log_prob")  # the tub console script has no cwd on sys.path
    assert func(1.0) == -0.5 and source == folder / "targets.py"
    func, _ = load_user_function(f"{folder / 'targets.py'}:log_prob")
    assert func(0.0) == 0.0


@pytest.mark.parametrize("spec, says", [
    ("targets.py", "give FILE.py:FUNCTION or MODULE:FUNCTION"),
    ("targets.py:logprob", "targets.py defines no 'logprob' (it defines log_prob)"),
    ("targets:VALUE", "VALUE in targets is not callable (a int)"),
    ("missing.py:f", "no such file missing.py"),
    ("missing:f", "no module 'missing' here or on the Python path"),
    ("broken.py:f", "importing broken.py failed (line 2): ZeroDivisionError: division by zero"),
    ("broken:f", "importing broken failed (line 2): ZeroDivisionError: division by zero"),
    ("needs.py:f", "needs the package 'a_package_nobody_has', which is not installed"),
    ("needs:f", "needs the package 'a_package_nobody_has', which is not installed"),
])
def test_mistakes_are_one_line_about_the_users_code(folder, spec, says):
    with pytest.raises(TubError) as info:
        load_user_function(spec, "energy")
    message = str(info.value)
    assert message.startswith(f"energy {spec!r}: ") and says in message and "\n" not in message
    assert "plugin declaration" not in message
