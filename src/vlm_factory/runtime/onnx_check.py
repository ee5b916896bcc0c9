"""Refuse ONNX files whose external-data references point outside the model's own directory.

An ONNX file may keep tensor bytes in other files (`data_location: EXTERNAL`, with a `location`
relative to the .onnx file). A crafted or corrupted artifact could name `/etc/shadow` or
`../../secrets.bin` there, and whatever reads the graph (onnxruntime, onnx.load, a quantizer) would
read that file as weights. Every path an artifact references must therefore stay inside the
directory the artifact lives in: `check_external_data` walks every tensor of the graph (initializers,
sparse initializers, Constant-style tensor attributes, subgraphs and functions) without loading any
external data and refuses absolute locations and any that resolve, symlinks followed, outside it.

Call it before creating an onnxruntime session from a file you did not write yourself (the runtime
adapter, for every graph its onnx_config.json names).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from vlm_factory.errors import UserError
from vlm_factory.paths import contained


def _graph_tensors(graph) -> Iterator:
    """Every TensorProto of a graph and its subgraphs (data of a sparse tensor included)."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node) -> Iterator:
    for attribute in node.attribute:
        if attribute.HasField("t"):
            yield attribute.t
        yield from attribute.tensors
        if attribute.HasField("sparse_tensor"):
            yield attribute.sparse_tensor.values
            yield attribute.sparse_tensor.indices
        for sparse in attribute.sparse_tensors:
            yield sparse.values
            yield sparse.indices
        if attribute.HasField("g"):
            yield from _graph_tensors(attribute.g)
        for graph in attribute.graphs:
            yield from _graph_tensors(graph)


def external_data_locations(model) -> dict[str, str]:
    """tensor name -> `location` for every tensor of a loaded ModelProto whose data is external."""
    from onnx import TensorProto

    tensors = list(_graph_tensors(model.graph))
    for function in model.functions:
        for node in function.node:
            tensors.extend(_node_tensors(node))
    locations = {}
    for tensor in tensors:
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        entries = {entry.key: entry.value for entry in tensor.external_data}
        locations[tensor.name or "<unnamed>"] = entries.get("location", "")
    return locations


def check_external_data(onnx_path: Path | str) -> list[str]:
    """The external data files `onnx_path` references (relative, sorted); UserError for any outside its directory.

    Reads only the graph (no external data is opened). A file without external data returns [].
    """
    import onnx

    onnx_path = Path(onnx_path)
    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except FileNotFoundError:
        raise UserError(f"{onnx_path}: ONNX file not found; re-run its export") from None
    except Exception as exc:  # protobuf's DecodeError and friends
        detail = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise UserError(f"{onnx_path}: not a readable ONNX file ({detail}); re-run its export") from None
    base = onnx_path.parent
    files = set()
    for name, location in external_data_locations(model).items():
        # Absolute, `..` that leaves, a link out of the directory, a FIFO or directory: all refused (paths.py).
        contained(base, location, what=onnx_path, key=f"tensor {name!r} external data location",
                  fix="re-export it, or put the data file beside the .onnx file")
        files.add(location)
    return sorted(files)
