"""tub core: plugin discovery, shared config/device/run layer. No science in here."""

from tubcli.errors import TubError
from tubcli.hookspecs import EncoderSpec, hookimpl
from tubcli.verbs import PluginApp, Verb

__version__ = "0.2.0"
__all__ = ["PluginApp", "Verb", "TubError", "EncoderSpec", "hookimpl", "__version__"]
