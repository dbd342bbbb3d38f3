"""Reading tables: CSV, NPZ, Parquet; bad files are one-line TubErrors."""

import numpy as np
import pytest

from tub_knnlrp.data import bundled, read_table, write_table_csv
from tubcli.errors import TubError


def test_csv_round_trip_keeps_names_and_labels(tmp_path):
    t = bundled("iris")
    path = tmp_path / "iris.csv"
    write_table_csv(path, t.X, t.feature_names, t.y)
    back = read_table(path, "target", require_target=True)
    np.testing.assert_array_equal(back.X, t.X)
    np.testing.assert_array_equal(back.y, t.y)
    assert back.feature_names == t.feature_names
    assert read_table(path, "absent").y is None  # an optional label column may be missing


def test_npz_without_pickle(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, X=np.eye(3), y=np.array([0, 1, 1]), feature_names=np.array(["a", "b", "c"]))
    t = read_table(path, require_target=True)
    assert t.feature_names == ["a", "b", "c"] and t.y.tolist() == [0, 1, 1]
    bad = tmp_path / "obj.npz"
    np.savez(bad, X=np.array([{"a": 1}], dtype=object))
    with pytest.raises(TubError, match="without pickle"):
        read_table(bad)


def test_parquet(tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    path = tmp_path / "d.parquet"
    pd.DataFrame({"u": [1.0, 2.0, 3.0], "v": [0.5, 0.1, 0.2], "label": ["a", "b", "a"]}).to_parquet(path)
    t = read_table(path, "label", require_target=True)
    assert t.feature_names == ["u", "v"] and t.y.tolist() == ["a", "b", "a"]


@pytest.mark.parametrize(
    "text, words",
    [
        ("a,b,target\n1,x,0\n", "not numeric"),
        ("a,b,target\n1,,0\n", "not numeric"),
        ("a,b,target\n1,2\n", "number of fields"),
        ("a,b,target\n", "no data rows"),
        ("a,b,target\n1,nan,0\n", "missing or infinite"),
    ],
)
def test_bad_csv_is_a_one_line_error(tmp_path, text, words):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(TubError, match=words) as info:
        read_table(path, "target")
    assert "\n" not in str(info.value)


def test_missing_target_is_named(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(TubError, match="no column 'y'"):
        read_table(path, "y", require_target=True)
