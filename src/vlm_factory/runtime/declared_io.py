"""A model file's declared inputs and outputs against the names its runtime config gives them.

The ONNX adapter checks each graph (its session's inputs and outputs), the TFLite adapter each
signature (its runner's input and output details), the same way: every name the config gives exists,
the file takes no input the adapter would leave unfed, and a mismatch is one line naming the config,
the key to blame and the file (runtime/artifact_schema.py `config_error`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from vlm_factory.errors import UserError
from vlm_factory.runtime.artifact_schema import config_error


class DeclaredIO:
    """`inputs` and `outputs` map tensor names to what the file declares about them; `holder` names
    what declares them in messages ("the graph", "signature 'prefill'")."""

    def __init__(self, inputs: Mapping, outputs: Mapping, path: Path, config_path: Path, holder: str):
        self.inputs, self.outputs = dict(inputs), dict(outputs)
        self.path, self.config_path, self.holder = path, config_path, holder

    def fail(self, key: str, reason: str) -> UserError:
        return config_error(self.config_path, key, f"{reason} ({self.path.name})")

    def takes_exactly(self, fed: dict[str, str], extra_key: str) -> None:
        """The inputs are the names in `fed` (key -> name), no more: the adapter feeds only those."""
        for key, name in fed.items():
            if name not in self.inputs:
                raise self.fail(key, f"names input {name!r}, which {self.holder} does not take")
        extra = sorted(set(self.inputs) - set(fed.values()))
        if extra:
            raise self.fail(extra_key, f"leaves input(s) {extra[:3]} of {self.holder} unfed")

    def gives(self, wanted: dict[str, str]) -> None:
        for key, name in wanted.items():
            if name not in self.outputs:
                raise self.fail(key, f"names output {name!r}, which {self.holder} does not give")
