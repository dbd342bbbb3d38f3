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
    with pytest.raises(TubError, match="array 'X' holds Python objects"):
        read_table(bad)
    # labels straight from pandas (string labels are an object array): the message names the array and the fix
    np.savez(bad, X=np.eye(3), y=np.array(["a", "b", "b"], dtype=object))
    with pytest.raises(TubError, match=r"array 'y' holds Python objects .*astype\(str\)"):
        read_table(bad, require_target=True)


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
        ("a,b,target\n1,x,0\n2,,1\n", "not numeric"),  # a text column with a gap: encode it first
        ("a,b,target\n1,2,0\n1,,0\n", r"missing value in column 'b' \(row 2\)"),
        ("a,b,target\n1,NA,0\n", r"missing value in column 'b' \(row 1\)"),
        ("a,b,target\n1,2\n", "number of fields"),
        ("a,b,target\n", "no data rows"),
        ("a,b,target\n1,nan,0\n", "missing value"),
        ("a,b,target\n1,-inf,0\n", "infinite value"),
        ("a,a,c,target\n1,2,3,0\n", "two columns named 'a'"),
        ("6.3,2.9,5.6,1\n5.1,3.5,1.4,0\n", "first line holds numbers"),  # no header line
        ("6.3,2.9,5.6,setosa\n5.1,3.5,1.4,setosa\n", "first line holds numbers"),  # ... and a text label
    ],
)
def test_bad_csv_is_a_one_line_error(tmp_path, text, words):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(TubError, match=words) as info:
        read_table(path, "target")
    assert "\n" not in str(info.value)


def test_integer_column_names_are_names_not_data(tmp_path):
    path = tmp_path / "pixels.csv"
    path.write_text("0,1,2,target\n0.5,0.25,1,0\n")
    t = read_table(path, "target")
    assert t.feature_names == ["0", "1", "2"] and t.X.shape == (1, 3)


def test_missing_target_is_named(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(TubError, match="no column 'y'"):
        read_table(path, "y", require_target=True)


@pytest.mark.parametrize("cell", ["", "nan"])
def test_missing_label_is_an_error_not_a_class(tmp_path, cell):
    path = tmp_path / "d.csv"
    path.write_text(f"a,target\n1,0\n2,{cell}\n3,1\n")
    with pytest.raises(TubError, match=r"missing label in column 'target' \(row 2\); drop or fill it"):
        read_table(path, "target", require_target=True)
    assert read_table(path, "target").y is None  # when the labels are only dropped, the rows still count


def test_missing_npz_label_is_an_error(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, X=np.eye(3), y=np.array([0.0, np.nan, 1.0]))
    with pytest.raises(TubError, match=r"missing label in column 'y' \(row 2\)"):
        read_table(path, require_target=True)


def test_duplicate_npz_feature_names_are_an_error(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, X=np.eye(3), feature_names=np.array(["a", "a", "b"]))
    with pytest.raises(TubError, match="two columns named 'a'"):
        read_table(path)


def test_excel_byte_order_mark_is_not_part_of_the_first_name(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes("target,a,b\n1,2,3\n0,4,5\n".encode("utf-8-sig"))
    t = read_table(path, "target", require_target=True)
    assert t.feature_names == ["a", "b"] and t.y.tolist() == [1, 0]


def test_parquet_without_an_engine_names_the_package(tmp_path, monkeypatch):
    pd = pytest.importorskip("pandas")

    def no_engine(*args, **kwargs):
        raise ImportError("Unable to find a usable engine; tried using: 'pyarrow', 'fastparquet'.\nmore")

    monkeypatch.setattr(pd, "read_parquet", no_engine)
    path = tmp_path / "d.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(TubError, match="pip install pyarrow") as info:
        read_table(path, "target")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("name, text, needle", [
    ("idx.csv", ",a,b,target\n0,1,3,0\n1,2,4,1\n", "column 1 has no name"),  # pandas' df.to_csv()
    ("semi.csv", "a;b;target\n1;3;0\n2;4;1\n", "is not comma-separated"),  # European Excel
    ("semi.tsv", "a;b;target\n1;3;0\n2;4;1\n", "is not tab-separated"),
])
def test_an_index_column_or_another_delimiter_is_named(tmp_path, name, text, needle):
    (tmp_path / name).write_text(text)
    with pytest.raises(TubError, match=needle):
        read_table(tmp_path / name, target="target", require_target=True)
