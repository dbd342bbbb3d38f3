"""Readers of the formats every plugin takes (NumPy arrays, torch checkpoints): other files are one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tubcli.errors import TubError
from tubcli.io import check_torch_file, load_numpy, load_torch_state


def test_load_numpy_reads_arrays_and_archives_and_names_what_else_it_got(tmp_path):
    np.save(tmp_path / "a.npy", np.arange(3))
    np.savez(tmp_path / "b.npz", x=np.ones(2))
    assert load_numpy(tmp_path / "a.npy").tolist() == [0, 1, 2]
    with load_numpy(tmp_path / "b.npz") as z:
        assert z["x"].tolist() == [1.0, 1.0]
    (tmp_path / "empty.npz").write_bytes(b"")
    (tmp_path / "text.npy").write_text("slide_id,label\n")
    (tmp_path / "cut.npz").write_bytes((tmp_path / "b.npz").read_bytes()[:40])
    for name, words in (("empty.npz", "it is empty"), ("text.npy", "no NumPy header"), ("cut.npz", "cut-short")):
        with pytest.raises(TubError, match=words) as exc:
            load_numpy(tmp_path / name)
        assert "pickle" not in str(exc.value)  # numpy's own message suggests unpickling a text file
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(TubError, match="holds Python objects"):
        load_numpy(tmp_path / "obj.npy")  # never unpickled, and not called damaged


def test_torch_files_are_checked_before_torch_reads_them(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "ok.pt")
    check_torch_file(tmp_path / "ok.pt")
    assert torch.equal(load_torch_state(tmp_path / "ok.pt")["w"], torch.ones(2))
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "labels.csv").write_text("a,b\n")
    with pytest.raises(TubError, match="is empty"):
        load_torch_state(tmp_path / "empty.pth")
    with pytest.raises(TubError, match="not a PyTorch checkpoint"):
        check_torch_file(tmp_path / "labels.csv")


def test_tile_images_transparent_pixels_are_white_like_a_slide_outside_its_scan(tmp_path):
    from PIL import Image

    from tubcli.images import read_rgb

    rgba = np.zeros((4, 4, 4), np.uint8)  # transparent black, as a slide-edge tile saved from read_region
    rgba[2:] = (200, 80, 150, 255)
    rgba[1] = (0, 0, 0, 128)  # half transparent black -> mid grey
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    got = read_rgb(tmp_path / "a.png")
    assert (got[0] == 255).all() and (got[2:] == (200, 80, 150)).all() and (np.abs(got[1].astype(int) - 127) <= 1).all()
    Image.fromarray(rgba[..., :3]).save(tmp_path / "b.png")  # no alpha: unchanged
    assert (read_rgb(tmp_path / "b.png")[0] == 0).all()


def test_image_files_follow_linked_class_folders_once_and_skip_hidden(tmp_path):
    from PIL import Image

    from tubcli.images import image_files

    (tmp_path / "store" / "tumor").mkdir(parents=True)
    (tmp_path / "tree" / "normal" / ".ipynb_checkpoints").mkdir(parents=True)
    tile = Image.fromarray(np.zeros((4, 4, 3), np.uint8))
    for name in ("store/tumor/t.png", "tree/normal/n.WEBP", "tree/normal/._n.png",
                 "tree/normal/.ipynb_checkpoints/c.png"):
        tile.save(tmp_path / name, format="PNG" if name.endswith("png") else "WEBP")
    (tmp_path / "tree" / "tumor").symlink_to(tmp_path / "store" / "tumor")
    (tmp_path / "tree" / "normal" / "loop").symlink_to(tmp_path / "tree")  # a link back up: read once
    assert [p.relative_to(tmp_path).as_posix() for p in image_files(tmp_path / "tree")] == \
        ["tree/normal/n.WEBP", "tree/tumor/t.png"]


def test_an_image_past_pils_pixel_limit_is_an_error_not_a_warning_and_gigabytes(tmp_path):
    """Between 1x and 2x its limit PIL only warns and decodes (a 25 KB PNG took 3 GB as one 'tile')."""
    from PIL import Image

    from tubcli.images import read_rgb

    Image.new("1", (10000, 10000), 1).save(tmp_path / "b.png")  # 100 Mpx > 89.5 Mpx
    with pytest.raises(TubError, match="more pixels than PIL reads safely"):
        read_rgb(tmp_path / "b.png")


def test_a_refused_pickle_is_named_without_torchs_banner_or_warning(tmp_path):
    """torch's refusal opens with 'Re-running torch.load with weights_only set to False will likely succeed'
    (i.e. run the file's code); tub names what the file pickles instead, and no pickle-protocol warning."""
    import os
    import pickle
    import warnings

    from tubcli.io import load_torch_state

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo ran > " + str(tmp_path / "marker"),))

    torch.save({"a": Payload()}, tmp_path / "evil.pth")
    with open(tmp_path / "plain.pt", "wb") as f:
        pickle.dump({"w": 1}, f, protocol=4)
    with pytest.raises(TubError, match=r"it pickles posix\.system, Python code rather than tensors") as err:
        load_torch_state(tmp_path / "evil.pth")
    assert "weights_only set to False" not in str(err.value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(TubError, match="a plain Python pickle, not a torch.save file"):
            load_torch_state(tmp_path / "plain.pt")
    assert not (tmp_path / "marker").exists()


def test_an_array_header_declaring_more_than_the_file_holds_is_named_not_a_memory_error(tmp_path):
    """A corrupt shape (10^9 x 1024) made numpy try to allocate 4 TB: a 'not enough memory, lower
    --batch-size' error for a damaged file."""
    import io
    import zipfile

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (10**9, 1024)})
    (tmp_path / "huge.npy").write_bytes(buf.getvalue() + bytes(256))
    with pytest.raises(TubError, match=r"cut-short NumPy file \(header declares shape \(1000000000, 1024\)"):
        load_numpy(tmp_path / "huge.npy")
    with zipfile.ZipFile(tmp_path / "huge.npz", "w") as z:
        z.writestr("X.npy", (tmp_path / "huge.npy").read_bytes())
    with pytest.raises(TubError, match="array 'X': header declares"):
        load_numpy(tmp_path / "huge.npz")
    np.savez_compressed(tmp_path / "ok.npz", X=np.eye(3), y=np.array(["a", "b", "c"]))
    with load_numpy(tmp_path / "ok.npz") as z:  # whole archives, compressed ones too, still read
        assert z["X"].shape == (3, 3) and z["y"].tolist() == ["a", "b", "c"]
