"""Keep environment values out of params.yaml when DVC composes conf/ (`dvc exp run -S ...`).

params.yaml is committed, so `${oc.env:...}` resolved into it would commit whatever the environment
held - a secret included. `vlm-factory compose` refuses such values itself, but DVC composes in its own
process and resolves every interpolation before any of our code runs. DVC loads Hydra plugins from the
repository root (`hydra.plugins_path`, default: the root) and Hydra imports every module of the
`hydra_plugins` namespace package while scanning, so this module replaces the `oc.env` resolver there
with one that refuses, naming what to do instead. It defines no plugin class; importing it is the point.
"""

from omegaconf import OmegaConf


def _refuse_environment(name, default=None):
    raise ValueError(f"${{oc.env:{name}}} would write an environment value into params.yaml, which is "
                     "committed; set it through the environment at run time (or .dvc/config.local) instead")


OmegaConf.register_new_resolver("oc.env", _refuse_environment, replace=True)
