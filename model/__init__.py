"""The Slow-Fast video LLM (arXiv 2504.01328): our implementation, loading the released checkpoints.

Public API: `SlowFastVLM`, `VideoQuery`, `TextQuery`, `Generation`; see README "Model".

The package itself imports neither torch nor transformers: each public name loads its module on
first use, so processes that never run the model (ingest actors, the CLI's followers) can read
`model.prompt` and `model.errors` without paying for them (about 450 MB and seconds per process).
"""

from importlib import import_module, metadata

from packaging.version import Version

# The oldest versions the test suite passed with (pyproject.toml states the same bounds).
MIN_VERSIONS = {"torch": "2.8", "transformers": "5.0"}

# Public name -> the submodule that defines it.
_PUBLIC = {
    "CheckpointError": "errors",
    "Generation": "api",
    "ModelInputError": "errors",
    "SlowFastConfig": "config",
    "SlowFastVLM": "api",
    "TextQuery": "api",
    "UnsupportedConfigError": "errors",
    "VideoQuery": "api",
}
__all__ = sorted(_PUBLIC)


def check_versions(found: dict[str, str]) -> None:
    """ImportError naming the package, the version found and the bound, for anything too old."""
    for package, version in found.items():
        if Version(Version(version).base_version) < Version(MIN_VERSIONS[package]):
            raise ImportError(
                f"slowfast-stream needs {package}>={MIN_VERSIONS[package]}, found {package} {version}: "
                f"pip install -U '{package}>={MIN_VERSIONS[package]}'"
            )


def check_installed_versions() -> None:
    """check_versions on the installed torch and transformers, read from their metadata (so
    without importing them); model/config.py runs it on import, and every module that builds
    or loads the model imports that one."""
    check_versions({package: metadata.version(package) for package in MIN_VERSIONS})


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
