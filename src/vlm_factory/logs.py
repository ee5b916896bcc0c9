"""Logging set up by entry points (stages, CLI; the library itself logs through logging.getLogger(__name__)),
and the library's progress bars.

setup_logging() also quietens what dependencies print on every run and never matters here; each filter below
names the exact logger, message and reason. VLM_FACTORY_LOG=DEBUG turns every one of them off, and an
environment variable the user set is never overridden.

Progress bars: on a terminal, tqdm bars as usual. Anywhere else (dvc repro's logs, CI) no redrawn bars: the
library's own bars (`progress_bar()`) log one line when they end (what, how many, how long) and third-party bars
are off, through their own switches where they have one (transformers, litert-torch, ai-edge-quantizer at its
call site) and otherwise through tqdm's default (coremltools' pass pipelines).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import re
import sys
import tempfile
import warnings

from tqdm import tqdm

_quiet = False  # setup_logging() turned the filters on (native_stderr_filtered() acts only then)
SHOW_ALL = "VLM_FACTORY_LOG=DEBUG shows them all"


def interactive() -> bool:
    """stderr is a terminal (where bars are drawn)."""
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def setup_logging(level: str | None = None) -> None:
    """Timestamped INFO logs on stderr; VLM_FACTORY_LOG=DEBUG for more. Quietens chatty dependencies."""
    name = (level or os.environ.get("VLM_FACTORY_LOG", "INFO")).upper()
    logging.basicConfig(level=name, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # e.g. the torchvision fallback notice, irrelevant on CPU-only installs
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    if not interactive():
        _bars_off()
    numeric = logging.getLevelName(name)
    global _quiet
    if isinstance(numeric, int) and numeric <= logging.DEBUG:  # everything below is filtering: DEBUG shows it all
        for logger_name, installed in _installed:  # (put there by an earlier call in this process)
            logging.getLogger(logger_name).removeFilter(installed)
        _installed.clear()
        for logger_name in _CHATTY:
            logging.getLogger(logger_name).setLevel(logging.NOTSET)
        _quiet = False
        return
    _quiet_native()
    _quiet_loggers()
    # torch deprecates LeafSpec and warns whenever one is copied or pickled (torch.export, litert-torch and
    # onnx exports copy tree specs; Python reports it from copyreg.py); nothing of ours uses the class.
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning)
    _quiet = True


def _setdefault_env(name: str, value: str) -> None:
    """Set an environment variable unless the user did (theirs wins, e.g. TF_CPP_MIN_LOG_LEVEL=0)."""
    os.environ.setdefault(name, value)


def _bars_off() -> None:
    """Third-party progress bars off on a non-terminal stderr (each redraw would be a line of the log)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # transformers' "Loading weights" and huggingface_hub's download bars
    _setdefault_env("LITERT_TORCH_SHOW_PROGRESS", "n")  # litert-torch's "(00:00) [START] ..." tree (on stdout)
    # coremltools' "Running MIL ... pipeline" and compression pass bars have no switch: tqdm's own default,
    # TQDM_DISABLE. tqdm reads TQDM_* when it is imported, and torch imports it before any stage can call
    # this, so the default the imported class holds is set too. A bar that passes disable= itself (progress_bar()
    # below, ai-edge-quantizer's) is not affected.
    _setdefault_env("TQDM_DISABLE", "1")
    if os.environ["TQDM_DISABLE"] == "1" and "tqdm.std" in sys.modules:
        init = vars(sys.modules["tqdm.std"].tqdm).get("__init__")
        if isinstance(init, functools.partialmethod):  # tqdm's envwrap: defaults from TQDM_*
            init.keywords.setdefault("disable", True)


def _quiet_native() -> None:
    """Native libraries' log level, read when they load (after this in every stage: they are imported lazily)."""
    # TensorFlow's C++ INFO lines (e.g. cpu_feature_guard's "This TensorFlow binary is optimized to use available
    # CPU instructions ..."); its warnings and errors still show. The lines its shared libraries print while
    # loading, before absl logging is initialised, ignore this: native_stderr_filtered() drops those.
    _setdefault_env("TF_CPP_MIN_LOG_LEVEL", "1")


class _Drop(logging.Filter):
    """Drops a logger's records whose message matches `pattern`."""

    def __init__(self, pattern: str):
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.search(record.getMessage())


class _Once(logging.Filter):
    """The first record matching `pattern` passes, with `note` appended; later ones are dropped. One instance
    may sit on several loggers, to collapse one kind of notice that several of them print."""

    def __init__(self, pattern: str, note: str):
        super().__init__()
        self.pattern, self.note, self.seen = re.compile(pattern), note, False

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.pattern.search(record.getMessage()):
            return True
        if self.seen:
            return False
        self.seen = True
        message = re.sub(r"(?:/[^\s/:]+)+/([^\s/:]+)", r"\1", record.getMessage())  # paths: file names only
        record.msg, record.args = f"{message} ({self.note}; {SHOW_ALL})", None
        return True


class _RootInfoFrom(logging.Filter):
    """Drops INFO and below logged on the root logger (logging.info(...)) from inside the given packages."""

    def __init__(self, *packages: str):
        super().__init__()
        self.dirs = tuple(f"{os.sep}{p}{os.sep}" for p in packages)

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not any(d in record.pathname for d in self.dirs)


_installed: list[tuple[str, logging.Filter]] = []  # (logger, filter) added by _quiet_loggers, once per process


def _add_filter(logger_name: str, new: logging.Filter) -> None:
    logging.getLogger(logger_name).addFilter(new)
    _installed.append((logger_name, new))


# Loggers whose INFO is chatter (their warnings stay):
_CHATTY = (
    "coremltools",  # every op it converts or removes (thousands of lines per export)
    "onnxscript", "onnx_ir",  # the ONNX exporter's passes, a line per node ("Skipping constant folding for node")
    "jax._src.xla_bridge",  # jax (litert-torch lowers some ops through it) probing for a TPU ("Unable to ...")
    "gguf.gguf_writer",  # "This GGUF file is for Little Endian only", "Writing the following files": ours says what
)


def _quiet_loggers() -> None:
    for name in _CHATTY:
        logging.getLogger(name).setLevel(logging.WARNING)
    if _installed:  # setup_logging may run more than once in a process (tests call stages' main)
        return
    # litert-torch ("Use JAX lowering: aten.mm", one per op kind) and ai-edge-quantizer ("Serializing model...")
    # log progress with logging.info() on the root logger, so no logger level of theirs can be set.
    _add_filter("root", _RootInfoFrom("litert_torch", "ai_edge_quantizer"))
    # torchao registers its enums with a torch API deprecated for enums (torch warns once per enum, through its
    # own handler); torchao's business, nothing to do here.
    _add_filter("torch.utils._pytree", _Drop(r"is an Enum subclass and is now natively supported by torch\.compile"))
    # torchao tries to load each of its optional native kernel libraries (built for other Pythons or GPUs) and its
    # triton kernels, and warns for each missing one: one line says so. Nothing here uses torchao kernels.
    torchao = _Once(r"^Failed to load .*_C\w*\.\S*so: |^Warning: Detected no triton",
                    "torchao's optional kernels are absent on this install; later such notices not shown")
    for name in ("torchao", "torchao.kernel.intmm"):
        _add_filter(name, torchao)
    # coremltools' Python bindings to Core ML (libcoremlpython) exist on macOS only: it warns once per proxy
    # class (eight lines); exporting does not need them. One line says so.
    _add_filter("coremltools", _Once(r"^Failed to load _ML\w*Proxy: No module named 'coremltools\.libcoremlpython'",
                                     "Core ML's runtime is macOS-only; later such notices not shown"))
    # coremltools checks the versions of converters' sources it might be asked to convert from: we never convert
    # scikit-learn or TensorFlow models with it (its notice about the torch version is kept).
    _add_filter("coremltools", _Drop(r"^scikit-learn version \S+ is not supported\. .*Disabling scikit-learn "
                                     r"conversion API\.$|^TensorFlow version \S+ has not been tested with coremltools"))


# Lines native libraries print on fd 2 that no switch turns off: TensorFlow's (and litert's copies of its) shared
# libraries log at INFO while they load, before absl logging is initialised (so TF_CPP_MIN_LOG_LEVEL does not
# apply). These exact lines, nothing else.
NATIVE_NOISE = re.compile(
    rb"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR\r?$"
    rb"|I\d{4} [\d:.]+ +\d+ port\.cc:\d+\] oneDNN custom operations are on\."
    rb"|I\d{4} [\d:.]+ +\d+ cudart_stub\.cc:\d+\] Could not find cuda drivers on your machine, GPU will not be used\.")


@contextlib.contextmanager
def native_stderr_filtered():
    """Within the block, what is written to fd 2 (native code and Python alike) is held, then written back
    without NATIVE_NOISE lines. For short steps only (importing TensorFlow-based packages): a crash inside
    would lose the held lines. Off unless setup_logging() turned filters on."""
    saved = None
    if _quiet:
        with contextlib.suppress(AttributeError, OSError, ValueError):
            sys.stderr.flush()
            saved = os.dup(2)
    if saved is None:
        yield
        return
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(AttributeError, OSError, ValueError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            kept = memoryview(b"".join(line for line in held if not NATIVE_NOISE.match(line)))
            while kept:
                kept = kept[os.write(2, kept):]


progress_log = logging.getLogger("vlm_factory.progress")


def progress_bar(iterable=None, *, desc: str, unit: str = "it", total: float | None = None, disable: bool = False):
    """The library's progress bar: a tqdm bar on a terminal; elsewhere no bar, and one INFO line when it ends
    ("<desc>: <n> <unit> in <time> (<rate>)", with its last postfix). Used as tqdm is (iterate, update,
    set_postfix, close, with-block)."""
    if interactive():
        return tqdm(iterable, desc=desc, unit=unit, total=total, disable=disable)
    return _LoggedBar(iterable, desc=desc, unit=unit, total=total, disable=disable, file=_Discard(),
                      mininterval=math.inf)


class _LoggedBar(tqdm):
    """A bar that counts as tqdm does, draws nowhere, and logs one line when closed."""

    def close(self):
        if not getattr(self, "disable", True) and hasattr(self, "last_print_t"):  # not closed yet, nor disabled
            elapsed, unit = self.format_dict["elapsed"], self.unit.strip()
            count = f"{self.n:g}" + (f"/{self.total:g}" if self.total is not None and self.n != self.total else "")
            rate = f"{self.n / elapsed:.3g} {unit}/s" if elapsed > 0 else "-"
            postfix = f", {self.postfix}" if self.postfix else ""
            progress_log.info("%s: %s %s in %s (%s%s)", self.desc, count, unit, self.format_interval(elapsed),
                              rate, postfix)
        super().close()


class _Discard:
    """A stream that keeps nothing."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass
