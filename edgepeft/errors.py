"""One exception type per user-facing failure family; the CLI prints each as one line."""


class EdgepeftError(Exception):
    """Base of every error edgepeft raises on purpose. `exit_code` is what the CLI returns."""

    exit_code = 2


class BundleError(EdgepeftError):
    """A bundle directory, manifest or one of its files is missing, corrupt or inconsistent."""


class AdapterError(EdgepeftError):
    """A PEFT adapter directory or an exported adapter file cannot be read."""


class AdapterMismatch(EdgepeftError):
    """An adapter does not fit the base it is used with (other base, other shapes)."""


class UnsupportedAdapter(EdgepeftError):
    """The adapter kind (or one of its options) cannot run on the requested backend."""


class UnsupportedModel(EdgepeftError):
    """The base model's architecture or configuration is outside what the exporter handles."""


class MissingExtra(EdgepeftError):
    """An optional dependency is not installed; the message names the pip extra."""


class InvalidArgument(EdgepeftError, ValueError):
    """A value given to a call or a command is out of range or unknown (a sampling parameter, a
    token budget, a device name). Also a ValueError, so callers that catch ValueError still do."""


class EngineError(EdgepeftError):
    """A failure while running a model (not caused by bad input)."""

    exit_code = 1


def unknown_adapter(name: str, have, where=None) -> BundleError:
    """The error for adapter `name` missing among `have` (names), prefixed by `where` if given."""
    prefix = f"{where}: " if where is not None else ""
    return BundleError(f"{prefix}no adapter named {name!r} (have: {', '.join(have) or 'none'})")


def require(module: str, extra: str):
    """Import an optional dependency or raise MissingExtra naming the extra that provides it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise MissingExtra(
            f"{module} is not installed: pip install 'edgepeft[{extra}]' ({e})"
        ) from None
