"""Per-slide steps of the batch verbs: tile, embed, explain, render."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from tubcli.errors import TubError
from tubcli.images import say_left_out
from tubcli.io import atomic_path, refuse_broken_link

from tub_xmil.slides import open_slide, slide_mpp


def expand_inputs(paths, suffixes) -> list[Path]:
    """Files given directly, plus files with a known suffix inside given folders (not recursive).

    Outputs are named by file stem, so two different inputs with one stem (``a/s.tiff`` and
    ``b/s.tiff``, or ``s.tiff`` and ``s.svs``) are an error before any work starts; otherwise the
    second would be silently skipped as already done."""
    out: dict[Path, Path] = {}  # resolved -> as given; the same file named twice counts once
    aliases: dict[Path, list[str]] = {}  # other names of one file
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise TubError(f"{p}: no such file or folder")
        if p.is_dir() and not _is_pt_folder(p):
            entries = sorted(p.iterdir())
            found = [q for q in entries if q.suffix.lower() in suffixes]
            say_left_out(p, [q.name for q in entries if q not in found and not q.name.startswith(".") and q.is_file()])
            for q in found:
                refuse_broken_link(q)
            found = [q for q in found if q.is_file()]
        else:
            found = [p]
        for q in found:
            first = out.setdefault(q.resolve(), q)
            if first.stem != q.stem:  # e.g. a folder of links into a slide archive: its outputs carry one name
                aliases.setdefault(first, []).append(q.name)
    for first, names in aliases.items():
        logging.getLogger("tub").warning(
            "%d input(s) are the same file as %s (links: %s%s); it is processed once, under the name %r: labels "
            "under the other names find no outputs", len(names), first.name, ", ".join(names[:3]),
            ", ..." if len(names) > 3 else "", first.stem)
    if not out:
        raise TubError("no inputs; give slide/feature files or folders that contain them")
    by_stem: dict[str, Path] = {}
    for q in out.values():
        if q.stem in by_stem:
            raise TubError(f"two inputs are named {q.stem!r} ({by_stem[q.stem]}, {q}); their outputs would "
                           "collide — rename one")
        by_stem[q.stem] = q
    return list(out.values())


def _is_pt_folder(p: Path) -> bool:
    """An xMIL per-patch folder is one bag; a folder of per-slide .pt bags is a folder of inputs."""
    from tub_xmil.bags import is_patch_folder

    return is_patch_folder(p)


def save_png(path: Path, arr: np.ndarray) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")


def tile_one(path: Path, out_h5: Path, out_dir: Path, tiling, mpp_override=None) -> dict:
    from tub_xmil.tiling import tile_slide, write_patches_h5

    slide = open_slide(path)
    try:
        mpp = slide_mpp(slide, path, mpp_override)
        t = tile_slide(slide, mpp, tiling.target_mpp, tiling.patch_size, tiling.min_tissue, tiling.min_std,
                       name=path.name)
    finally:
        slide.close()
    save_png(out_dir / "thumbnails" / f"{path.stem}.png", t.thumbnail)
    save_png(out_dir / "masks" / f"{path.stem}.png", (t.mask * 255).astype(np.uint8))
    with atomic_path(out_h5) as tmp:
        write_patches_h5(tmp, t, path.stem)
    return {"patches": len(t.coords)}


def coords_file(coords_dir: Path, stem: str) -> Path:
    """The patches .h5 of a slide in ``--coords-dir``: tub/CLAM name it ``{stem}.h5``, TRIDENT
    ``{stem}_patches.h5``, directly in the folder, in its ``patches/`` or, for the run directory of
    `tub xmil tile`, in ``outputs/patches/``."""
    names = [f"{stem}.h5", f"{stem}_patches.h5"]
    for sub in ("", "patches", "outputs/patches"):
        for n in names:
            if (coords_dir / sub / n).is_file():
                return coords_dir / sub / n
    raise TubError(f"{stem}: no {' or '.join(names)} in {coords_dir} or its patches/; give the folder "
                   "that holds the slide's patches .h5")


def check_coords_fit(coords, attrs: dict, dims, source, slide_name: str) -> None:
    """TubError unless the coordinates of ``source`` (a patches or features file) belong to this slide:
    made for a slide of its level-0 size (when recorded) and inside it. Coordinates of another scan
    (40x tiles on the 20x slide) would embed white padding and draw a blank heatmap without a word."""
    W, H = (int(v) for v in dims)
    made_for = (attrs.get("level0_width"), attrs.get("level0_height"))
    if None not in made_for and (int(made_for[0]), int(made_for[1])) != (W, H):
        raise TubError(f"{source}: made for a {int(made_for[0])}x{int(made_for[1])} slide, but {slide_name} is "
                       f"{W}x{H} (level 0); is it the file of another slide or scan?")
    if len(coords) and ((coords < 0).any() or (coords[:, 0] >= W).any() or (coords[:, 1] >= H).any()):
        raise TubError(f"{source}: coordinates lie outside {slide_name} ({W}x{H} level-0 px); is it the file of "
                       "another slide or scan?")


def slide_coords(path: Path, cfg, coords_dir: Path | None):
    """(slide, coords, size_level0, tiling attributes) from an existing patches .h5 or by tiling.

    Reused coordinates need no mpp, so a slide without one goes through; its mpp (or the patches
    file's) is still recorded when known."""
    from tub_xmil.tiling import (SIZE_FROM_GRID, TILING_KEYS, read_coords_h5, tile_size_level0_source, tile_slide,
                                 tiling_attrs)

    slide = open_slide(path)
    try:
        if coords_dir is None:
            t = tile_slide(slide, slide_mpp(slide, path, cfg.mpp), cfg.tiling.target_mpp, cfg.tiling.patch_size,
                           cfg.tiling.min_tissue, cfg.tiling.min_std, name=path.name)
            return slide, t.coords, t.patch_size_level0, tiling_attrs(t)
        h5 = coords_file(Path(coords_dir), path.stem)
        coords, found = read_coords_h5(h5)
        if len(coords) == 0:  # a tiler that found no tissue wrote an empty file (tub atlas tile does)
            raise TubError(f"{h5}: holds no tiles (its tiler found no tissue on {path.name}); leave the slide out "
                           "or tile it again with a lower tissue threshold")
        attrs = {k: found[k] for k in TILING_KEYS if k in found}
        attrs["patch_size_level0"], source = tile_size_level0_source(found, coords, name=h5.name)
        if source == SIZE_FROM_GRID:  # carried into the features file, so heatmap can still say so
            attrs["patch_size_level0_source"] = source
        check_coords_fit(coords, found, slide.dimensions, h5, path.name)
        try:
            attrs["mpp"] = slide_mpp(slide, path, cfg.mpp)
        except TubError:
            pass  # no mpp in the slide: keep the patches file's, if any
        attrs["level0_width"], attrs["level0_height"] = slide.dimensions
        return slide, coords, attrs["patch_size_level0"], attrs
    except Exception:
        slide.close()
        raise


def features_one(path: Path, out_h5: Path, cfg, spec, module, device, dtype=None,
                 weights_sha256: str | None = None) -> dict:
    """Features of one slide, with how its tiles were cut (TRIDENT/CLAM attributes) and the
    encoder (and its weights' digest) and precision that embedded them."""
    from tub_xmil.bags import write_features_h5
    from tub_xmil.features import embed_tiles

    slide, coords, size0, attrs = slide_coords(path, cfg, cfg.coords_dir)
    try:
        feats = embed_tiles(slide, coords, size0, spec, module, cfg.batch_size, device, dtype)
    finally:
        slide.close()
    seen = {"encoder_tile_size": spec.tile_size}  # the tiles are resized to it: the resolution the encoder sees
    if attrs.get("mpp"):
        seen["encoder_mpp"] = float(attrs["mpp"]) * size0 / spec.tile_size
    if weights_sha256:
        seen["encoder_weights_sha256"] = weights_sha256
    with atomic_path(out_h5) as tmp:
        write_features_h5(tmp, feats, coords, {**attrs, **seen, "encoder": spec.name, "precision": cfg.precision,
                                               "name": path.stem})
    return {"patches": len(coords), "dim": int(feats.shape[1])}


def choose_target(model, x, task, target):
    if task != "classification":
        return 0
    if target is not None:
        return int(target)
    import torch  # here, not at the top: tiling needs no torch (2-4 s to import)

    with torch.no_grad():
        return int(model(x[None]).argmax(-1)[0])


def _no_bias(model, section) -> bool:
    # spec §3: TransMIL defaults to no_bias=False, the others to True
    return getattr(model, "kind", "") != "transmil" if section.no_bias is None else bool(section.no_bias)


def lrp_settings(model, section, task: str) -> dict:
    """The LRP settings a run used, defaults resolved for this architecture and task: for its results
    (a methods section needs them; config.yaml keeps only what was asked, ``null`` for a default)."""
    from tub_xmil.lrp import DEFAULT_OUTPUT_RELEVANCE

    mode = (section.explained_rel if task == "classification" else None) or DEFAULT_OUTPUT_RELEVANCE[task]
    return {"gamma": section.gamma, "eps": section.eps, "no_bias": _no_bias(model, section), "output_relevance": mode}


def lrp_params_for(model, section):
    from tub_xmil.lrp import LRPParams

    no_bias = _no_bias(model, section)
    if section.no_bias and getattr(model, "kind", "") == "transmil":
        import logging
        logging.getLogger("tub").warning(
            "TransMIL LRP with no_bias=True zeroes the attention biases in the explanation pass: the "
            "explained logit differs from the model's; scores do not explain the real prediction exactly")
    return LRPParams(gamma=section.gamma, eps=section.eps, no_bias=no_bias)


def explain_bag(model, x, method, task, target, cfg, seed=0) -> np.ndarray:
    from tub_xmil.explain import explain

    rel = cfg.lrp.explained_rel if task == "classification" else None
    return explain(model, x, method, task, target, lrp=lrp_params_for(model, cfg.lrp), ig_steps=cfg.ig_steps,
                   seed=seed, explained_rel=rel)


def thumbnail_for(slide, max_side: int = 2048):
    """(RGB thumbnail, downsample vs level 0) at the deepest level whose long side >= 256 px or /32."""
    from PIL import Image

    W, H = slide.dimensions
    target_ds = max(1.0, max(W, H) / max_side, 32.0 if max(W, H) / 32 >= 256 else 1.0)
    lvl = slide.get_best_level_for_downsample(target_ds)
    lw, lh = slide.level_dimensions[lvl]
    region = slide.read_region((0, 0), lvl, (lw, lh))
    bg = Image.new("RGB", region.size, (255, 255, 255))
    bg.paste(region, mask=region.split()[3])
    return np.asarray(bg), slide.level_downsamples[lvl]
