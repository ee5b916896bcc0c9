"""How far an artifact's numbers are from the reference's, for tests (the gate's own cosine is
vlm_factory.eval.artifact_parity.cosine)."""

import numpy as np


def rel_diff(actual, expected) -> float:
    """Largest absolute difference relative to the reference's largest magnitude."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())
