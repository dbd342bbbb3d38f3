"""tub-mlff: the verbs and where they live (imports tubcli only)."""

from tubcli import PluginApp, Verb, hookimpl

_C = "tub_mlff.config:"
_F = "tub_mlff.cli:"
_KEYS = {"energy-key": "keys.energy", "forces-key": "keys.forces", "stress-key": "keys.stress",
         "virials-key": "keys.virial", "charge-key": "keys.charge", "spin-key": "keys.spin"}

app = PluginApp(
    name="mlff",
    help="SpookyNet force fields (charge/spin aware, nonlocal) and the Na-storage workflow: build, label, train, MD, OCV, diffusion.",
    verbs=[
        Verb("build", _F + "build", config=_C + "BuildConfig",
             help="Build Na_x aminobenzene-functionalised Janus graphene cells (extxyz).",
             options={"n": "n", "groups": "groups", "stacking": "stacking", "x": "x", "sites": "sites",
                      "variants": "variants", "rattle": "rattle", "interlayer": "interlayer"}),
        Verb("label", _F + "label", config=_C + "LabelConfig",
             help="Reference energies/forces/stress with GFN-xTB (tblite) or DFT on clusters (PySCF).",
             args=["structures"], options={"method": "method", "xc": "xc", "basis": "basis",
                                           "cluster-radius": "cluster_radius", "cluster-center": "cluster_center"},
             batch=True),
        Verb("train", _F + "train", config=_C + "TrainConfig",
             help="Train SpookyNet on energies + forces (+ stress); EMA, early stopping, --ensemble N.",
             args=["data"], options={"valid": "valid", "epochs": "epochs", "batch-size": "batch_size", "lr": "lr",
                                     "ensemble": "ensemble", "init-from": "init_from", "max-minutes": "max_minutes", "e0s": "e0s",
                                     **_KEYS},
             training=True, resume_may_change=("epochs", "max_minutes")),
        Verb("evaluate", _F + "evaluate", config=_C + "EvaluateConfig",
             help="Energy/force/stress MAE and RMSE on a labelled set, parity plots.",
             args=["data"], options={"model": "model", **_KEYS}),
        Verb("predict", _F + "predict", config=_C + "PredictConfig",
             help="Energies, forces, stress and charges of structures, labelled or not, under mlff_* keys.",
             args=["structures"], options={"model": "model", "prefix": "prefix", "charge-key": "keys.charge",
                                           "spin-key": "keys.spin"}, batch=True),
        Verb("md", _F + "md", config=_C + "MDConfig",
             help="Molecular dynamics (NVT Langevin/Bussi, NVE, NPT); trajectory, thermo log, resume.",
             args=["structure"], options={"model": "model", "temp": "temp", "steps": "steps",
                                          "ensemble": "ensemble", "timestep": "timestep", "interval": "interval",
                                          "pressure": "pressure", "friction": "friction", "taut": "taut",
                                          "taup": "taup", "npt-cell": "npt_cell"}, continues=True),
        Verb("ocv", _F + "ocv", config=_C + "OCVConfig",
             help="Formation energies vs x, convex hull, voltage profile, capacity, volume change.",
             options={"model": "model", "structures": "structures", "x-max": "x_max",
                      "relax-steps": "relax_steps", "cell": "cell", "mu-na-lattice": "mu_na_lattice",
                      "reference": "reference", "md-average": "md_average"}),
        Verb("diffusion", _F + "diffusion", config=_C + "DiffusionConfig",
             help="Na diffusivity from MD (unwrapped MSD, time origins, drift removed; or --estimator ase, "
                  "ASE DiffusionCoefficient's one-origin fit) and an Arrhenius fit.",
             args=["trajectories"], options={"element": "element", "axes": "axes", "blocks": "blocks",
                                                  "equilibration": "equilibration", "estimator": "estimator",
                                                  "timestep": "timestep", "species": "species",
                                                  "temperature": "temperatures"}),
        Verb("explain", _F + "explain", config=_C + "ExplainConfig",
             help="Per-atom energy terms and charges, Na site comparison, attention maps, n-body walks.",
             args=["structures"], options={"model": "model", "attention": "attention", "walks": "walks",
                                           "walk-radius": "walk_radius"}),
    ],
    demo="tub_mlff.demo:run_demo",
    requires={"torch": "pip install torch==2.13.0 (CPU build; on a GPU the build for your CUDA)",
              "ase": "pip install ase", "scipy": "pip install scipy", "safetensors": "pip install safetensors"},
    optional={"tblite": "pip install tblite  (GFN-xTB labels)", "pyscf": "pip install pyscf  (DFT labels)"},
)


@hookimpl
def tub_register(registry):
    registry.add(app)
