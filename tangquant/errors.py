"""Exceptions raised by tangquant's library code.

``cli.main`` turns any :class:`TangquantError` into a one-line
``tangquant: error: ...`` message and exit code 2.
"""


class TangquantError(Exception):
    """Base class of every error tangquant reports to the user."""


class InputError(TangquantError):
    """An input path or file is missing, unreadable or of the wrong kind."""


class OutputExistsError(TangquantError):
    """The output exists and ``--force`` was not given, overlaps an input, or another run writes it."""


class OutputError(TangquantError):
    """The output cannot be written: a read-only file system, a full disk, a file in the way."""


class PickleRefusedError(InputError):
    """Only pickle (``.bin``/``.pt``) weights were found and pickles were not allowed."""


class QuantizedModelError(InputError):
    """A model that is already quantized was given where full precision is needed."""


class AdapterError(TangquantError):
    """The adapter is malformed, unsupported, or does not fit the base model."""


class ShapeMismatchError(AdapterError):
    """An adapter tensor does not fit the base tensor it targets."""


class NumericalError(TangquantError):
    """A computation produced NaN or Inf."""


class CalibrationError(TangquantError):
    """Calibration or evaluation data is empty, malformed or too short."""


class ParameterError(TangquantError):
    """A stage parameter (a flag or a recipe key) has a value the stage cannot take."""


class RecipeError(ParameterError):
    """A recipe file is malformed, holds unknown keys or values of the wrong type."""


class QuantizationError(TangquantError):
    """Quantization settings are invalid for this model or algorithm."""


class ExportError(TangquantError):
    """The OpenVINO export failed or produced a model that does not load."""


class BenchError(TangquantError):
    """A benchmark candidate is malformed or failed."""


class ServeError(TangquantError):
    """The server cannot start with the given settings."""


class EngineError(ParameterError):
    """An engine asked for something it does not have: an unknown name, an option it does not
    take, a model format it does not read, a feature it lacks."""


def short(value, limit: int = 80) -> str:
    """A value for an error message, cut short: a hostile value must never be formatted whole."""
    if isinstance(value, (list, dict, tuple, set)):
        return f"a {type(value).__name__} of {len(value)}"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type's name when it has none), cut short."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= limit else line[:limit] + "…"


def is_utf8(text: str) -> bool:
    """False for a str holding lone surrogates (undecodable bytes from argv or a terminal)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class ChatTemplateError(TangquantError):
    """A chat that one of the forms tangquant ships (openvino-genai, llama.cpp, ollama) would render
    unlike the model's own Hugging Face chat template."""
