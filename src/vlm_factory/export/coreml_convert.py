"""Core ML conversion steps: trace, convert, name every weight after the model's parameter, palettize, describe.

The packages must be readable back into the family's own PyTorch model (runtime/coreml_runtime.py), so
each converted weight is mapped to a parameter name of the full model: jit.trace + ct.convert name a
const after the parameter's path in the traced wrapper (dots as underscores), and the wrapper's
parameters are the model's own tensors, so the map is made by tensor identity, never by spelling
out any family's module paths.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from vlm_factory.runtime.coreml_weights import base_name, read_package_weights

# Weights with fewer elements stay float (norm scales, biases); k-means on them saves nothing.
WEIGHT_THRESHOLD = 2048
KMEANS_WORKERS = 1  # >1 forks worker processes that deadlocked here after torch had started its threads
AUTHOR = "vlm-factory"
LICENSE = "Apache-2.0 (model weights: see the checkpoint's README)"


def mil_weight_name(name: str) -> str:
    """The MIL const name jit.trace + ct.convert give a module parameter (before any `_to_fp16` suffix)."""
    return name.replace(".", "_")


def parameter_names(model: nn.Module) -> dict[int, str]:
    """{id(tensor): name} of the full model; a tied tensor has the one name named_parameters() reports."""
    return {id(p): name for name, p in model.named_parameters()}


def used_parameters(module: nn.Module, *example) -> set[int]:
    """ids of the parameters one forward pass reads, i.e. those a gradient reaches.

    A wrapper that holds the whole model (so names stay the model's) must not claim weights it never
    uses (the LLM under the vision wrapper, SigLIP's post-layernorm, which LLaVA reads around)."""
    params = list(module.parameters())
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
            p.grad = None
        with torch.enable_grad():
            out = module(*example)
            (out if torch.is_tensor(out) else sum(o.sum() for o in out.values())).float().sum().backward()
        return {id(p) for p in params if p.grad is not None}
    finally:
        for p, flag in zip(params, flags):
            p.grad = None
            p.requires_grad_(flag)


def weight_map(wrapper: nn.Module, model: nn.Module, used: set[int] | None = None) -> dict[str, str]:
    """{MIL const name: full-model parameter name} for the wrapper's parameters (only `used` ones if given)."""
    names = parameter_names(model)
    result = {}
    for name, p in wrapper.named_parameters():
        if used is not None and id(p) not in used:
            continue
        if id(p) not in names:
            raise RuntimeError(f"{type(wrapper).__name__}.{name} is not a parameter of the model")
        result[mil_weight_name(name)] = names[id(p)]
    return result


def convert(wrapper: nn.Module, example: tuple, inputs: list, outputs: list, states: list | None = None):
    import coremltools as ct

    with torch.no_grad():
        traced = torch.jit.trace(wrapper, example, check_trace=False)
    kwargs = {"states": states} if states else {}
    try:
        return ct.convert(traced, inputs=inputs, outputs=outputs, minimum_deployment_target=ct.target.iOS18,
                          compute_precision=ct.precision.FLOAT16, convert_to="mlprogram", **kwargs)
    except Exception as exc:
        raise RuntimeError(f"coremltools could not convert {type(wrapper).__name__}: "
                           f"{str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__}") from exc


def resolve_weights(mlmodel, wrapper: nn.Module, weights: dict[str, str], unused: list[str],
                    constants: dict[str, float]) -> dict[str, str]:
    """The weight map, checked against the converted program; what is not found by name is placed:

    - a parameter of all ones or all zeros (a fresh norm scale, a zero bias) that the converter removed
      as an identity (x * 1, x + 0) goes to `constants` with that value, which is what the package
      computes with;
    - a parameter folded into an unnamed const (SigLIP's position embedding: a gather over constant
      position ids) is renamed to that const, found by its values;
    - anything else goes to `unused`; the runtime fills it with NaN, so a wrong guess here poisons
      every output instead of hiding."""
    params = {mil_weight_name(name): p.detach().numpy() for name, p in wrapper.named_parameters()}
    consts = {base_name(op.name): np.asarray(op.outputs[0].val)
              for op in mlmodel._mil_program.functions["main"].operations
              if op.op_type == "const" and op.outputs[0].val is not None and np.ndim(op.outputs[0].val) > 0}
    resolved = {}
    for name, torch_name in weights.items():
        if name in consts:
            resolved[name] = torch_name
            continue
        value = params[name]
        if value.size and value.flat[0] in (0.0, 1.0) and np.all(value == value.flat[0]):
            constants[torch_name] = float(value.flat[0])
            continue
        want = value.astype(np.float16).astype(np.float32)
        matches = [c for c, const in consts.items() if c not in weights and const.size == want.size
                   and np.array_equal(const.astype(np.float32).reshape(want.shape), want)]
        if not matches:
            unused.append(torch_name)
            continue
        if len(matches) != 1:
            raise RuntimeError(f"{torch_name}: no single const in the converted program holds it "
                               f"({len(matches)} candidates); the package could not be mapped back to torch")
        resolved[matches[0]] = torch_name
    return resolved


def palettize(mlmodel, weights: dict[str, str], settings: dict, bits: dict[str, int | None]):
    """k-means LUT palettization of every mapped weight above WEIGHT_THRESHOLD elements, each at the nbits
    `bits` gives its const (None: left as converted); other consts (RoPE tables, zero biases the converter
    adds) are excluded by name."""
    from coremltools.optimize.coreml import OpPalettizerConfig, OptimizationConfig, palettize_weights

    kwargs = {"group_size": settings["group_size"]} if settings["granularity"] == "per_grouped_channel" else {}
    configs = {nbits: OpPalettizerConfig(mode="kmeans", nbits=nbits, granularity=settings["granularity"],
                                         weight_threshold=WEIGHT_THRESHOLD, num_kmeans_workers=KMEANS_WORKERS, **kwargs)
               for nbits in set(bits.values()) - {None}}
    per_op = {}
    for op in mlmodel._mil_program.functions["main"].operations:
        if op.op_type == "const":
            nbits = bits.get(base_name(op.name))
            per_op[op.name] = configs[nbits] if nbits is not None else None
    if not configs:
        return mlmodel
    return palettize_weights(mlmodel, OptimizationConfig(global_config=None, op_name_configs=per_op))


def describe(mlmodel, short: str, inputs: dict, outputs: dict, metadata: dict) -> None:
    mlmodel.author = AUTHOR
    mlmodel.license = LICENSE
    mlmodel.short_description = short
    mlmodel.version = metadata.get("vlm_factory.tier", "")
    for name, text in inputs.items():
        mlmodel.input_description[name] = text
    for name, text in outputs.items():
        mlmodel.output_description[name] = text
    mlmodel.user_defined_metadata.update({k: str(v) for k, v in metadata.items()})


def package_entry(path, weights: dict[str, str], nbits: dict[str, int | str]) -> dict:
    """What the report says about one saved package, after checking every mapped weight is in it; `nbits`
    per component it holds (fp16: unpalettized)."""
    found = read_package_weights(path)
    missing = sorted(set(weights) - set(found))
    if missing:
        raise RuntimeError(f"{path.name}: weights not found in the saved package: {missing[:5]} "
                           f"(it holds {sorted(found)[:8]})")
    palettized = sorted(n for n in weights if found[n][1] == "constexpr_lut_to_dense")
    return {"file": path.name, "file_bytes": sum(p.stat().st_size for p in path.rglob("*") if p.is_file()),
            "weights": len(weights), "palettized_weights": len(palettized), "nbits": nbits,
            "float_weights": sorted(set(weights) - set(palettized))}
