"""A toy plugin for the core's tests: a light declaration, as every real plugin's plugin.py."""

from tubcli import EncoderSpec, PluginApp, Verb, hookimpl

app = PluginApp(
    name="toy",
    help="A toy plugin: least-squares training, a batch verb and an explanation.",
    verbs=[
        Verb("train", "tub_toy.verbs:train", config="tub_toy.verbs:TrainConfig", help="Fit y = w.x by gradient descent.",
             args=["data"], options={"epochs": "epochs", "lr": "optim.lr"}, training=True,
             resume_may_change=("epochs",)),
        Verb("evaluate", "tub_toy.verbs:evaluate", config="tub_toy.verbs:SquareConfig",
             help="Square the number in each input file.", args=["inputs"], batch=True),
        Verb("explain", "tub_toy.verbs:explain", config="tub_toy.verbs:ExplainConfig",
             help="Gradient x input of the fitted model.", args=["weights"]),
    ],
    demo="tub_toy.verbs:demo",
    requires={"numpy": "pip install numpy"},
    optional={"nonexistent_optional_pkg": "pip install nonexistent-optional-pkg"},
)


@hookimpl
def tub_register(registry):
    registry.add(app)


@hookimpl
def tub_patch_encoders():
    return {"toy-mean": EncoderSpec(name="toy-mean", loader="tub_toy.verbs:mean_encoder", dim=3, tile_size=8)}
