"""The atlas verbs: thin functions ``verb(cfg, run) -> dict`` over the science modules."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np

from tubcli.config import given_fields
from tubcli.device import say_device_unused
from tubcli.errors import TubError
from tubcli.io import write_json

from .config import (BenchConfig, ConvertConfig, EmbedConfig, EncoderSection, EvaluateConfig, ExplainConfig,
                     InspectConfig, MakeDataConfig, TileConfig, TrainConfig)


def _need(value, what: str):
    if value is None or value == []:
        raise TubError(f"missing {what}; see --help")
    return value


def _warn_ignored_compute(cfg, run, honoured: tuple[str, ...] = ("fp32",), uses_device: bool = True) -> None:
    """A --precision this verb does not compute in, or a --device it never computes on, is said, not only
    recorded in config.yaml (embed and bench honour bf16/fp16; explain also fp64; evaluate's probes, tiny
    layers, and the file verbs run on the CPU)."""
    if cfg.precision not in honoured:
        run.log.warning("tub atlas %s does not compute in --precision %s (it keeps its own precision; only %s "
                        "%s here)", run.verb, cfg.precision, "/".join(honoured), "applies" if len(honoured) == 1 else "apply")
    if not uses_device:
        say_device_unused(cfg, run)


def _check_gemm(gemm: str, device, flag: str = "--gemm", precision: str = "fp32", gradients: bool = False) -> None:
    """--gemm onednn where tub's oneDNN inference path cannot run is refused before any input is read (it
    was used silently not at all, or failed on every input): CPU, fp32 (bf16/fp16 run under autocast, which
    that path leaves to aten; fp64 has no oneDNN GEMM), and no gradients (explain)."""
    if gemm != "onednn":
        return
    if device.type != "cpu":
        raise TubError(f"{flag} onednn runs on the CPU only (device is {device}); use {flag} auto or --device cpu")
    if gradients:
        raise TubError(f"{flag} onednn applies to inference only; explaining takes gradients through aten's GEMMs: "
                       f"use {flag} auto")
    if precision != "fp32":
        raise TubError(f"{flag} onednn runs in fp32 only (--precision {precision}: bf16/fp16 run under autocast, "
                       f"fp64 has no oneDNN GEMM); use {flag} auto or --precision fp32")


# train's frozen teacher: its own option names (error messages must name options train has)
TEACHER_OPTIONS = {"arch": "--teacher-arch", "weights": "--teacher-weights", "random_init": "--teacher-random-init",
                   "heads": "--set teacher.heads", "img_size": "--set teacher.img_size", "gemm": "--set teacher.gemm",
                   "norm": "--set teacher.norm", "pool": "--set teacher.pool"}
STUDENT_OPTIONS = {"arch": "--student-arch", "arch_auto": False}


def _encoder(sec: EncoderSection, run, options: dict | None = None, precision: str = "fp32", gradients: bool = False):
    from .encoder import load_encoder

    _check_gemm(sec.gemm, run.device, (options or {}).get("gemm", "--gemm"), precision, gradients)
    enc, info = load_encoder(sec.arch, sec.weights, pool=sec.pool, heads=sec.heads, norm=sec.norm,
                             img_size=sec.img_size, random_init=sec.random_init, seed=run.seed,
                             device=run.device, options=options)
    enc.vit.gemm = info["gemm"] = sec.gemm
    return enc, info


# ------------------------------------------------------------------ inspect / convert
def inspect(cfg: InspectConfig, run) -> dict:
    from .checkpoint import (SSL_HEAD_PREFIXES, describe, detect_layout, infer_config, load_tensors, model_json_for,
                             stored_settings, strip_wrappers, to_timm_layout)

    path = _need(cfg.weights, "WEIGHTS (a checkpoint file)")
    raw = load_tensors(path)
    sd = to_timm_layout(raw, cfg.source)
    heads, eps, _ = stored_settings(Path(path), raw, cfg.heads)  # as embed/explain read it
    heads_from = "--heads" if cfg.heads is not None else model_json_for(Path(path)).name if heads is not None \
        else "width table (heads cannot be inferred from shapes)"
    out = describe(infer_config(sd, heads, eps))
    if heads is None and out["pos_layout"] == "rope":
        heads_from = "RoPE periods (head width = 4 x their count)"
    out["heads_from"] = heads_from
    out["checkpoint"] = str(path)
    stripped = strip_wrappers(raw)
    out["layout"] = detect_layout(stripped, cfg.source)
    out["ignored_keys"] = sorted(k for k in stripped if k.startswith(("head.", *SSL_HEAD_PREFIXES)))
    return out


def convert(cfg: ConvertConfig, run) -> dict:
    _warn_ignored_compute(cfg, run, ("fp32",), uses_device=False)
    from .checkpoint import (apply_preset, check_heads_option, describe, infer_config, load_tensors, model_json,
                             native_norm_eps, save_weights, to_timm_layout)
    from .presets import get_preset

    src = Path(_need(cfg.weights, "WEIGHTS (input checkpoint)"))
    dst = Path(_need(cfg.output, "OUTPUT (.safetensors path)"))
    if dst.suffix != ".safetensors":
        raise TubError(f"output {dst} must end in .safetensors")
    if dst.is_dir():
        raise TubError(f"output {dst} is a directory; give a file path ending in .safetensors")
    if dst.resolve() == src.resolve():
        raise TubError("output would overwrite the input checkpoint; choose another path")
    existing = [p for p in (dst, dst.with_suffix(".json")) if p.exists()]
    if existing and not run.overwrite:
        raise TubError(f"{existing[0]} exists; choose another output path or pass --overwrite")
    preset = get_preset(cfg.preset) if cfg.preset else None
    options = {"arch": "--preset", "arch_auto": False}
    check_heads_option(cfg.heads, preset, options)
    raw = load_tensors(src)
    sd = to_timm_layout(raw, cfg.source)
    heads = cfg.heads or (preset.num_heads if preset else None)
    vit_cfg = infer_config(sd, heads, native_norm_eps(raw), options, converting=True)
    if preset is not None:
        vit_cfg = apply_preset(vit_cfg, preset, options)
    norm = cfg.norm or (preset.norm if preset else None)
    pool = cfg.pool or (preset.pool if preset else "cls")
    meta = model_json(vit_cfg, norm=norm, pool=pool, preset=preset.name if preset else None,
                      img_size=preset.img_size if preset else None, source=f"converted from {src.name}")
    save_weights(dst, sd, meta)
    return {"output": str(dst), "model_json": str(dst.with_suffix(".json")), **describe(vit_cfg)}


# ------------------------------------------------------------------ embed
def embed(cfg: EmbedConfig, run) -> dict:
    """Options, input paths and the encoder are checked up front (one-line errors, exit 2); each input is
    read, tiled and embedded inside the batch loop, so a bad one becomes its line in failures.jsonl."""
    from .embedding import (SlideTables, check_existing_output, embed_tileset, encoder_attrs, output_path,
                            slide_embeddings, write_embeddings, write_eva_manifest)
    from .slides import check_coords_file, check_slide_options, write_slide_qc
    from .tiles import read_input, read_pathorob_metadata, say_exif_rotated

    if cfg.format == "pathorob":
        if cfg.metadata is None:
            raise TubError("--format pathorob needs --metadata (PathoROB CSV) and the image root")
        if cfg.inputs:
            raise TubError("--format pathorob reads its tiles from --metadata/--image-root; drop the INPUTS arguments")
        _refuse_slide_options(cfg, [], "--format pathorob reads tiles, not whole slides")
        sets = read_pathorob_metadata(cfg.metadata, cfg.image_root)
        names = {center: ts.name for center, ts in sets.items()}
        load = sources = sets.__getitem__  # an existing center file must hold this center's tiles
    else:
        if cfg.metadata is not None or cfg.image_root is not None:
            raise TubError("--metadata and --image-root are only used with --format pathorob")
        inputs = _slide_folders_opened(_need(cfg.inputs, "INPUTS (tile folders, .npz or .h5 files, whole slides)"))
        _refuse_slide_options(cfg, inputs)
        slide_options = {**cfg.slide_options(), "qc": cfg.slide_qc, "coords": cfg.slide_coords}
        check_slide_options(slide_options)
        names = _input_names(inputs)
        if cfg.slide_coords is not None:
            check_coords_file(Path(cfg.slide_coords), list(names))
        load = partial(read_input, slide_options=slide_options)
        sources = Path  # an existing output must come from this input path
    out_for = partial(output_path, cfg.format, run.outputs_dir)
    for item, name in names.items():  # every output name is safe, and an existing output is this input's
        out = out_for(name)
        if not run.overwrite:
            check_existing_output(cfg.format, out, sources(item))
    encoder, info = _encoder(cfg.encoder, run, precision=cfg.precision)
    dtype = run.dtype if cfg.precision in ("bf16", "fp16") else None
    if cfg.precision == "fp64":
        encoder.double()
    if cfg.encoder.weights is not None:
        info["weights_sha256"] = run.refuse_replaced_file("--weights", cfg.encoder.weights)
    write_json(run.dir / "encoder.json", info)
    attrs = encoder_attrs(cfg.encoder, info, cfg.precision, run.seed)
    if info["random_init"]:
        run.log.warning("embedding with a RANDOMLY INITIALISED %s (no weights given)", info["arch"])
    tables = SlideTables(run.dir, has_output=lambda name: out_for(name).exists())
    resized_said = exif_said = scale_said = False
    for item, out in run.batch(names, output_for=lambda item: out_for(names[item])):
        with run.item(item):
            name, ts = names[item], load(item)
            if not resized_said and "tiler" in ts.extra:
                resized_said = _say_slide_tiles_resized(ts.extra["tiler"], info["transform"]["img_size"], run.log)
            if cfg.slide_qc and "tiler" in ts.extra and ts.extra["tiler"].has_qc:
                write_slide_qc(ts.extra["tiler"], run.dir / "qc", name)
            try:
                emb = embed_tileset(encoder, ts, cfg.batch_size, run.device, dtype)
            finally:  # also when the input fails for another reason
                exif_said = exif_said or say_exif_rotated(ts, run.log)
            scale_said = scale_said or _say_tiles_far_from_input(ts, info["transform"]["img_size"], run.log)
            tables.add(name, slide_embeddings(ts.rows, emb, cfg.slide_pool))
            # whole slides: how each was tiled (level, footprint, tissue tiles)
            run.record_item(out, {"tiles": len(ts), "slide": ts.extra.get("slide")})
            write_embeddings(cfg.format, out, emb, ts, seed=run.seed, attrs=attrs)
    done = run.item_records()  # the run's, also of earlier invocations and other shards
    tiling = [r["slide"] for r in done if r["slide"] is not None]
    result = {"tiles": sum(r["tiles"] for r in done), "slides": tables.write(), "dim": info["dim"], "pool": info["pool"],
              "format": cfg.format, "arch": info["arch"], "random_init": info["random_init"],
              "outputs": str(run.outputs_dir)}
    if tiling:
        result["whole_slides"] = tiling
    if cfg.format == "eva":
        # every eva output of the run folder: also of earlier invocations and other shards
        rows, why = write_eva_manifest(run.dir, sorted(p.parent for p in run.outputs_dir.glob("*/manifest.csv")),
                                       run.seed)
        if why is not None:
            run.log.warning("no eva_manifest.csv: %s", why)
        result["eva_manifest"] = None if rows is None else str(run.dir / "eva_manifest.csv")
    if cfg.format == "pathorob":  # center -> file, as tub pathorob and the official scripts look it up
        result["centers"] = {center: out_for(name).name for center, name in names.items()}
    return result


def _slide_folders_opened(paths: list[Path], tiles_allowed: bool = True) -> list[Path]:
    """Each folder of whole slides replaced by its slides; tile folders kept (``tiles_allowed``) or
    refused."""
    from .slides import slides_in_folder

    out = []
    for p in paths:
        slides = slides_in_folder(p) if p.is_dir() else None
        if p.is_dir() and slides is None and not tiles_allowed:
            raise TubError(f"{p} holds no whole-slide images (.svs, .ndpi, .mrxs, pyramidal .tif, …)")
        out += slides if slides is not None else [p]
    return out


# the tiling and tissue settings that a patch file (--slide-coords) replaces
_TILING = ("slide_tile_size", "slide_mpp", "slide_mag", "slide_level", "slide_overlap", "slide_tissue_min",
           "slide_threshold", "slide_median", "slide_close", "slide_min_area", "slide_min_hole_area",
           "slide_max_holes", "slide_pen")


def _refuse_slide_options(cfg, inputs: list[Path], why: str = "none of the inputs is a whole slide") -> None:
    """Whole-slide settings (``--slide-*``) when no input can be a slide, or tiling settings with
    ``--slide-coords`` (its patch files fix the tiles), would be recorded, not used. A slide suffix
    counts (a .tif may be a tile): the file itself is read later, inside its batch item."""
    from .slides import SLIDE_EXT

    if getattr(cfg, "slide_coords", None) is not None and (idle := given_fields(cfg, list(_TILING))):
        raise TubError(f"{', '.join('--' + f.replace('_', '-') for f in idle)} do not apply with --slide-coords (its "
                       "patch files fix the tiles: size, level, tissue); drop them, or drop --slide-coords to tile anew")
    if any(p.suffix.lower() in SLIDE_EXT for p in inputs):
        return
    idle = given_fields(cfg, [f for f in type(cfg).model_fields if f.startswith("slide_") and f != "slide_pool"])
    if idle:
        raise TubError(f"{', '.join('--' + f.replace('_', '-') for f in idle)} act on whole slides only and {why}; "
                       "drop them")


def _say_tiles_far_from_input(ts, img_size: int, log) -> bool:
    """Tiles more than 4x smaller or larger than the encoder's input (thumbnails, a wrong pyramid level or
    magnification) are resized to it as the spec says, but are almost never meant. Said once per run."""
    first = ts.extra.get("first_tile")
    if first is None:
        return False
    path, shape = first
    scale = img_size / min(shape[:2])
    if 0.25 <= scale <= 4:
        return False
    log.warning("%s is %dx%d px, resized %.3gx to the encoder's %d px input; tiles at the magnification the "
                "encoder was trained on are about that size (said for the first such input of the run only)",
                path, shape[1], shape[0], scale, img_size)
    return True


def _say_slide_tiles_resized(tiler, img_size: int, log) -> bool:
    """A slide tile of another side than the encoder's input is resized: the resolution the encoder sees
    is not the recorded target_mpp. Said once per run; True when said."""
    if tiler.tile_px == img_size:
        return False
    seen = f" (at {tiler.target_mpp:.4g} µm/px the encoder sees {tiler.target_mpp * tiler.tile_px / img_size:.4g})" \
        if tiler.target_mpp else ""
    log.warning("whole-slide tiles of %d px are resized to the encoder's %d px input%s; give --slide-tile-size %d "
                "to embed at the tiling resolution", tiler.tile_px, img_size, seen, img_size)
    return True


def _input_names(paths: list[Path], check=None) -> dict[Path, str]:
    """Input path -> output name, after ``check`` (default ``tiles.check_input``) of every path, which
    must not open it: the same file given twice counts once, two inputs with one output name are an
    error naming both."""
    from .tiles import check_input, input_name

    names, claimed, seen = {}, {}, set()
    for p in paths:
        (check or check_input)(p)
        if p.resolve() in seen:
            continue
        seen.add(p.resolve())
        name = input_name(p)
        if name in claimed:
            raise TubError(f"inputs {claimed[name]} and {p} would both write outputs named {name!r}; "
                           "rename one or process them in separate runs (-o)")
        names[p], claimed[name] = name, p
    return names


# ------------------------------------------------------------------ tile (CLAM create_patches / TRIDENT coords)
def tile(cfg: TileConfig, run) -> dict:
    """Options, slide paths and output names are checked up front (exit 2); each slide is opened and
    segmented inside the batch loop, only by the shard that owns it, so a bad one (unreadable, or
    settings that do not fit it) becomes its line in failures.jsonl."""
    _warn_ignored_compute(cfg, run, ("fp32",), uses_device=False)
    from .slides import check_slide_file, check_slide_options, tile_slide

    slides = _slide_folders_opened(_need(cfg.inputs, "INPUTS (whole-slide images or folders of them)"),
                                   tiles_allowed=False)
    opts = cfg.slide_options()
    check_slide_options(opts)
    names = _input_names(slides, check=check_slide_file)
    for path, out in run.batch(names, output_for=lambda p: run.outputs_dir / "patches" / f"{names[p]}.h5",
                               check_output=_read_coords):
        with run.item(path):
            tile_slide(path, out, run.outputs_dir, opts, log=run.log, record=partial(run.record_item, out))
    done = run.item_records()  # the run's, also of earlier invocations and other shards
    failed = [f["item"] for f in run.failures]
    return {"slides": len(done), "tiles": int(sum(d["tissue_tiles"] for d in done)), "whole_slides": done,
            "failed": failed, "outputs": str(run.outputs_dir)}


def _read_coords(path: Path) -> None:
    """Read a finished patches file's coordinates (one damaged after it was written is no finished slide)."""
    import h5py

    with h5py.File(path, "r") as f:
        f["coords"][()]


# ------------------------------------------------------------------ evaluate
def evaluate(cfg: EvaluateConfig, run) -> dict:
    _warn_ignored_compute(cfg, run, ("fp32",), uses_device=False)
    from .features import LabelTable, common_encoder, concat, features_tiling, read_features
    from .probing import run_probes

    other = {"knn": ("runs", "lr", "batch_size", "max_steps", "patience", "eval_every"),
             "linear": ("k", "vote", "temperature")}.get(cfg.method, ())
    idle = given_fields(cfg, other)
    if idle:  # settings of the probe that does not run would be recorded, not used
        raise TubError(f"--method {cfg.method} does not use {', '.join('--' + f.replace('_', '-') for f in idle)}; "
                       "drop them or use --method both")

    paths = [q for p in _need(cfg.features, "FEATURES") for q in _embed_outputs(Path(p))]
    labels = LabelTable(cfg.labels) if cfg.labels is not None else None
    feats = concat([read_features(p, cfg.metadata, labels) for p in paths])
    return run_probes(feats, cfg, run, encoder=common_encoder(paths), tiling=features_tiling(paths))


def _embed_outputs(path: Path) -> list[Path]:
    """An ``embed`` run directory (or its ``outputs/``) stands for the embeddings in it: its pathorob
    folder of {center}.npz, its ``eva_manifest.csv``, or each npy/eva folder and h5 file; anything else is
    itself."""
    outputs = path / "outputs" if (path / "env.json").is_file() and (path / "outputs").is_dir() else path
    if not (outputs.name == "outputs" and (outputs.parent / "env.json").is_file()):
        return [path]
    if list(outputs.glob("*.npz")):
        return [outputs]
    if (outputs.parent / "eva_manifest.csv").is_file():  # eva outputs: the run's one split over all inputs
        return [outputs.parent / "eva_manifest.csv"]
    found = sorted(q for q in outputs.iterdir() if not q.name.startswith(".")
                   and (q.is_dir() or q.suffix in (".h5", ".npz")))
    if not found:
        raise TubError(f"{path} is a run directory with no embeddings in outputs/; give an 'atlas embed' run")
    return found


# ------------------------------------------------------------------ explain
def explain(cfg: ExplainConfig, run) -> dict:
    """Input paths and the encoder are checked up front (exit 2); each input is read inside its batch
    item (``explain_inputs``), so a bad one becomes its line in failures.jsonl."""
    _warn_ignored_compute(cfg, run, ("fp32", "fp64"))
    from .explaining import explain_inputs
    from .slides import check_coords_file, check_slide_options

    _refuse_idle_explain_options(cfg)
    inputs = _slide_folders_opened(_need(cfg.inputs, "INPUTS to explain (tile folders, .npz or .h5 files, "
                                                     "whole slides)"))
    _refuse_slide_options(cfg, inputs)
    names = _input_names(inputs)
    check_slide_options({**cfg.slide_options(), "coords": cfg.slide_coords})
    if cfg.slide_coords is not None:
        check_coords_file(Path(cfg.slide_coords), list(names))
    encoder, info = _encoder(cfg.encoder, run, gradients=True)
    if cfg.encoder.weights is not None:  # retrained into the same file: skipped maps were made with other bytes
        info["weights_sha256"] = run.refuse_replaced_file("--weights", cfg.encoder.weights)
    if cfg.probe is not None:
        run.refuse_replaced_file("--probe", cfg.probe)
    write_json(run.dir / "encoder.json", info)
    return explain_inputs(encoder, names, cfg, run, info)


# What each --method/--target reads; any other of these settings would be recorded, not used.
_EXPLAIN_READS = {"rollout": {"head_fusion"}, "dim": {"target", "index"}, "probe": {"target", "index", "probe"},
                  "similarity": {"target", "reference"}}


def _refuse_idle_explain_options(cfg: ExplainConfig) -> None:
    reads = _EXPLAIN_READS["rollout" if cfg.method == "rollout" else cfg.target]
    idle = given_fields(cfg, [f for f in ("target", "index", "probe", "reference", "head_fusion") if f not in reads])
    if not idle:
        return
    flags = ", ".join("--" + f.replace("_", "-") for f in idle)
    if cfg.method == "rollout":
        raise TubError(f"--method rollout does not use {flags}: attention rollout is class-agnostic (the CLS "
                       "token's attention flow); drop them or use --method lrp or attnlrp")
    raise TubError(f"--method {cfg.method} --target {cfg.target} does not use {flags}; drop them or choose "
                   "the --method/--target that reads them")


# ------------------------------------------------------------------ train (distillation or DINOv2)
def train(cfg: TrainConfig, run) -> dict:
    _warn_ignored_compute(cfg, run, ("fp32",))
    import torch

    from .checkpoint import model_json
    from .distill import train_student
    from .tiles import read_input

    sets = [read_input(p) for p in _need(cfg.tiles, "TILES (unlabelled tile folders or arrays)")]
    if cfg.objective == "dinov2":
        return _train_dinov2(cfg, run, sets)
    dinov2_only = given_fields(cfg.dinov2)
    if dinov2_only:  # the distill objective never reads the dinov2 section: these would be recorded, not used
        raise TubError(f"dinov2.{', dinov2.'.join(dinov2_only)} act on --objective dinov2 only; drop them or add "
                       "--objective dinov2")
    teacher, t_info = _encoder(cfg.teacher, run, TEACHER_OPTIONS)
    sp, s_cfg, student, tiles, s_norm = _student(cfg, run, sets)
    torch.manual_seed(run.seed)
    result = train_student(teacher, student, s_norm, tiles, run, steps=cfg.steps, batch_size=cfg.batch_size,
                           crop_size=cfg.crop_size, crop_scale_min=cfg.crop_scale_min, lr=cfg.lr,
                           weight_decay=cfg.weight_decay, warmup=cfg.warmup, clip=cfg.clip,
                           lambda_cls=cfg.lambda_cls, lambda_patch=cfg.lambda_patch,
                           checkpoint_every=cfg.checkpoint_every, log_every=cfg.log_every)
    distiller = result.pop("distiller")
    meta = model_json(s_cfg, norm=sp.norm, pool=sp.pool, img_size=cfg.crop_size, preset=sp.name,
                      source=f"distilled from {t_info['weights']}")
    run.save_weights({k: v.detach().cpu().contiguous() for k, v in student.state_dict().items()}, meta)
    run.save_weights({k: v.detach().cpu().contiguous() for k, v in
                      {**{"proj_cls." + k: v for k, v in distiller.proj_cls.state_dict().items()},
                       **{"proj_patch." + k: v for k, v in distiller.proj_patch.state_dict().items()}}.items()},
                     {"teacher_dim": teacher.vit.cfg.embed_dim, "student_dim": s_cfg.embed_dim},
                     name="projections")
    result["teacher"] = t_info["weights"]
    result["student"] = sp.name
    _training_figure(run, result, [["loss", "loss_cls", "loss_patch"], ["lr"], ["grad_norm"]],
                     "distillation: CLS and patch-token losses")
    labels = [r["label"] for ts in sets for r in ts.rows]
    if len(set(labels) - {""}) >= 2:
        from .probing import teacher_student_knn

        result.update(teacher_student_knn(teacher, student, s_norm, tiles, sets, cfg, run))
    return result


def _training_figure(run, result: dict, panels: list[list[str]], title: str) -> None:
    """outputs/training.png from metrics.jsonl (every --log-every steps): the losses, the learning rate and
    the gradient norm per step, so a diverging or collapsing run shows at a glance."""
    from tubcli.plots import metric_rows, training_curves

    if run.is_main and training_curves(run.outputs_dir / "training.png", metric_rows(run.dir / "metrics.jsonl", "step"),
                                       "step", panels, title=title):
        result["training_curves"] = str(run.outputs_dir / "training.png")


def _student(cfg: TrainConfig, run, sets):
    """Student preset, config, network (given weights or from scratch), all tiles (a ``TileStream`` over
    ``sets``), its normalisation."""
    from . import tiles as tiles_mod
    from .checkpoint import read_checkpoint
    from .encoder import Transform
    from .presets import get_preset
    import torch

    from .synthetic import preset_config
    from .vit import VisionTransformer

    sp = get_preset(cfg.student.arch)
    if cfg.student.weights is not None:
        s_cfg, sd, _ = read_checkpoint(cfg.student.weights, preset=sp, options=STUDENT_OPTIONS)
        student = VisionTransformer(s_cfg)
        student.load_state_dict(sd)
    else:
        try:
            s_cfg = preset_config(sp.name, depth=cfg.student.depth,
                                  pos_grid=max(1, cfg.crop_size // (sp.patch_size or 1)))
        except ValueError as exc:
            raise TubError(f"{exc}; choose a student preset with fixed shapes") from None
        student = VisionTransformer(s_cfg).init_for_training(torch.Generator().manual_seed(run.seed))
    # read on demand: each step decodes the tiles it samples, never the whole corpus up front
    tiles = tiles_mod.TileStream(sets)
    if cfg.crop_size % s_cfg.patch_size:
        raise TubError(f"crop size {cfg.crop_size} is not divisible by the student patch size {s_cfg.patch_size}")
    s_norm = Transform(img_size=cfg.crop_size, mean=sp.mean_std[0], std=sp.mean_std[1]).normalise
    return sp, s_cfg, student, tiles, s_norm


def _train_dinov2(cfg: TrainConfig, run, sets) -> dict:
    """``--objective dinov2``: self-supervised student + EMA teacher (dinov2_ssl.py); no frozen teacher."""
    import torch

    from .checkpoint import model_json
    from .dinov2_ssl import train_ssl

    if cfg.teacher.weights is not None or cfg.teacher.random_init:
        raise TubError("--objective dinov2 trains its own EMA teacher; drop --teacher-weights/--teacher-random-init")
    fields = type(cfg).model_fields  # a dumped config (--print-config, config.yaml) repeats the defaults: fine
    distill_only = sorted(f for f in ("lr", "weight_decay", "warmup", "lambda_cls", "lambda_patch", "crop_scale_min")
                          if getattr(cfg, f) != fields[f].default)
    if distill_only:  # DINOv2 takes its schedule from the dinov2 section (dinov2.base_lr, …); these would be ignored
        raise TubError(f"{', '.join(distill_only)} act on --objective distill only; for dinov2 set the dinov2 "
                       "section instead (e.g. --set dinov2.base_lr=…, see `tub config atlas train`)")
    d = cfg.dinov2
    for name, (lo, hi) in (("global_scale", d.global_scale), ("local_scale", d.local_scale),
                           ("mask_ratio", d.mask_ratio)):
        if not 0 < lo <= hi <= 1:
            raise TubError(f"dinov2.{name} must be two numbers 0 < low <= high <= 1, got {lo}, {hi}")
    sp, s_cfg, student, tiles, s_norm = _student(cfg, run, sets)
    if d.local_crops and d.local_crop_size % s_cfg.patch_size:
        raise TubError(f"dinov2.local_crop_size {d.local_crop_size} is not divisible by the student patch size "
                       f"{s_cfg.patch_size}")
    torch.manual_seed(run.seed)
    res = train_ssl(student, s_norm, tiles, run, d.model_dump(), steps=cfg.steps, batch_size=cfg.batch_size,
                    global_size=cfg.crop_size, local_size=d.local_crop_size, clip=cfg.clip,
                    checkpoint_every=cfg.checkpoint_every, log_every=cfg.log_every)
    ssl_student, ssl_teacher = res.pop("student"), res.pop("teacher")
    res.pop("history")
    res.pop("parts")
    for name, net, what in (("model", ssl_student, "student"), ("teacher", ssl_teacher, "EMA teacher")):
        meta = model_json(s_cfg, norm=sp.norm, pool=sp.pool, img_size=cfg.crop_size, preset=sp.name,
                          source=f"DINOv2 self-supervision ({what}), {cfg.steps} steps")
        run.save_weights({k: v.detach().cpu().contiguous() for k, v in net.backbone.state_dict().items()}, meta,
                         name=name)
    res.update({"objective": "dinov2", "student": sp.name,
                "weights": str(run.checkpoints_dir / "model.safetensors"),
                "teacher_weights": str(run.checkpoints_dir / "teacher.safetensors")})
    _training_figure(run, res, [["loss", "loss_dino", "loss_ibot", "loss_koleo"],
                                ["teacher_entropy", "teacher_marginal_entropy"], ["lr"], ["grad_norm"]],
                     "DINOv2: a marginal entropy falling to 0 is a collapsed teacher")
    labels = [r["label"] for ts in sets for r in ts.rows]
    if len(set(labels) - {""}) >= 2:
        from .encoder import Encoder, Transform
        from .probing import teacher_student_knn

        ema = Encoder(ssl_teacher.backbone, Transform(img_size=cfg.crop_size, mean=sp.mean_std[0],
                                                      std=sp.mean_std[1]), "cls+mean")
        knn = teacher_student_knn(ema, ssl_student.backbone, s_norm, tiles, sets, cfg, run)
        res.update({k.replace("teacher_", "ema_teacher_"): v for k, v in knn.items() if k != "knn_gap"})
    return res


# ------------------------------------------------------------------ bench / make-data
def bench(cfg: BenchConfig, run) -> dict:
    """Preset, tile size and modes are checked first: a wrong one would otherwise time nothing or fail
    deep inside the model."""
    from .benchmark import MODES, time_models
    from .presets import get_preset

    p = get_preset(cfg.arch)
    if p.patch_size is None:
        raise TubError(f"preset {p.name} takes its shapes from a checkpoint; bench a preset with fixed shapes")
    if cfg.img_size % p.patch_size:
        raise TubError(f"--img-size {cfg.img_size} is not a multiple of {p.name}'s patch size {p.patch_size}")
    modes = tuple(m.strip() for m in cfg.modes.split(","))
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise TubError(f"unknown --modes {', '.join(map(repr, unknown))}; use {' or '.join(MODES)}, "
                       "comma-separated")
    _check_gemm(cfg.gemm, run.device)
    import importlib.util

    if cfg.compare_timm and importlib.util.find_spec("timm") is None:
        raise TubError("--compare-timm needs timm, which brings torchvision and its own torch: run it in a separate "
                       "venv (tub-atlas README, Parity procedure) or drop the flag to time tub alone")
    return time_models(p.name, depth=cfg.depth, batch_size=cfg.batch_size, img_size=cfg.img_size,
                       threads=cfg.threads, repeats=cfg.repeats, compare_timm=cfg.compare_timm,
                       device=run.device, precision=cfg.precision, modes=modes,
                       reference=cfg.reference, gemm=cfg.gemm, log=run.log)


def make_data(cfg: MakeDataConfig, run) -> dict:
    _warn_ignored_compute(cfg, run, ("fp32",), uses_device=False)
    from .synthetic import preset_config, random_vit, synthetic_tiles, write_pathorob_layout, write_tile_folder

    from tubcli.io import atomic_path

    out = Path(cfg.out) if cfg.out else run.outputs_dir
    if out.exists() and any(out.iterdir()) and out != run.outputs_dir:
        raise TubError(f"{out} exists and is not empty; choose a new folder")
    if cfg.depth is not None and not cfg.checkpoint:
        raise TubError("--depth sets the depth of the --checkpoint model; add --checkpoint PRESET or drop --depth")
    if cfg.checkpoint:  # before anything is written: a preset without fixed shapes is refused
        from .presets import get_preset

        preset_config(get_preset(cfg.checkpoint).name, depth=cfg.depth)
    data = synthetic_tiles(cfg.n_per_class, cfg.n_classes, cfg.n_centers, cfg.size, seed=run.seed)
    write_tile_folder(out / "tiles", data)
    with atomic_path(out / "tiles.npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, tiles=data["tiles"], labels=data["label"], slide_id=data["slide_id"],
                 patch_id=data["patch_id"], center=data["center"])
    csv_path = write_pathorob_layout(out / "pathorob", data)
    result = {"tiles": int(len(data["tiles"])), "folder": str(out / "tiles"), "npz": str(out / "tiles.npz"),
              "pathorob_metadata": str(csv_path)}
    if cfg.checkpoint:
        from .checkpoint import model_json, save_weights
        from .presets import get_preset

        p = get_preset(cfg.checkpoint)
        vcfg = preset_config(p.name, depth=cfg.depth)
        model = random_vit(vcfg, seed=run.seed)
        path = out / f"{p.name}-random.safetensors"
        save_weights(path, model.state_dict(), model_json(vcfg, norm=p.norm, pool=p.pool, preset=p.name,
                                                          img_size=p.img_size, source="RANDOM INIT (test data)"))
        result["checkpoint"] = str(path)
    (out / "README.txt").write_text("Synthetic tiles and random-weight checkpoints made by 'tub atlas make-data'; "
                                    "not real tissue, not a pretrained model.\n")
    return result
