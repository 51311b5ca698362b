"""Checks of the run's environment before anything is read or written.

Each failure is a `ConfigError` (exit 2, one line): an unknown runner, a
Dataflow job without project/region/temp_location or with local paths its
workers cannot see, gs:// paths without credentials (checked in about a
second instead of gcsfs retrying for over a minute), s3:// without s3fs.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import posixpath
from collections.abc import Iterable, Iterator

from apache_beam.options.pipeline_options import (
    GoogleCloudOptions,
    PipelineOptions,
    StandardOptions,
)

from pipelines.config import JobConfig
from pipelines.runner import is_local
from transforms.options import ConfigError
from transforms.spec import LabelingSpec
from transforms.uri import has_scheme, is_remote, scheme_of, strip_file_scheme

logger = logging.getLogger(__name__)

#: Seconds to wait for a GCE metadata server when no other credentials exist.
METADATA_PING_TIMEOUT_S = 1.0


def launcher_paths(config: JobConfig) -> Iterator[tuple[str, str]]:
    """(flag, path) of every path the launcher or the workers open as a whole
    (each model's, for several: named `models[i] (name): --model`)."""
    for name, value in (
        ("--input", config.input),
        ("--output", config.output),
        ("--skip-existing", config.skip_existing),
    ):
        if value:
            yield name, value
    models = list(_models(config))
    for where, spec in models:
        if spec.candidate_labels_file:
            yield f"{where}--candidate-labels-file", spec.candidate_labels_file
    if config.config:
        yield "--config", config.config
    for where, spec in models:
        if not spec.model_spec.is_default and has_scheme(spec.model):
            yield f"{where}--model", spec.model


def _models(config: JobConfig) -> Iterator[tuple[str, LabelingSpec]]:
    """(how a message names it, spec) of each model of the pass."""
    for i, model in enumerate(config.model_specs):
        yield ("" if model.name is None else f"models[{i}] ({model.name}): "), model.spec


def _local_model_dirs(config: JobConfig) -> Iterator[tuple[str, str]]:
    """(how a message names it, path) of each model that is a local directory."""
    for where, spec in _models(config):
        if not spec.model_spec.is_default and os.path.isdir(spec.model):
            yield where, spec.model


def check_runner(options: PipelineOptions) -> None:
    """The runner exists and, for Dataflow, has what it needs to submit."""
    runner = options.view_as(StandardOptions).runner
    if is_local(options):
        return
    from apache_beam.runners.runner import create_runner

    try:
        create_runner(runner)
    except ImportError as e:
        raise ConfigError(
            f"--runner {runner} needs packages that are not installed ({e}); for Dataflow "
            "install the gcp extra: pip install 'beam-image-labeler[gcp]'"
        ) from None
    except ValueError:
        raise ConfigError(
            f"--runner {runner} is not a Beam runner; use DirectRunner (the default) or "
            "DataflowRunner"
        ) from None
    if str(runner).lower() in ("dataflowrunner", "dataflow"):
        cloud = options.view_as(GoogleCloudOptions)
        missing = [
            name
            for name, value in (
                ("--project", cloud.project),
                ("--region", cloud.region),
                ("--temp_location", cloud.temp_location or cloud.staging_location),
            )
            if not value
        ]
        if missing:
            raise ConfigError(f"--runner DataflowRunner needs {', '.join(missing)}")


def check_remote_paths(config: JobConfig) -> None:
    """A job on remote workers cannot read or write this machine's files."""
    for name, path in launcher_paths(config):
        if name != "--config" and scheme_of(path) == "file":
            raise ConfigError(
                f"{name} {path} is a local path, which Dataflow workers cannot see; use a "
                "gs:// path"
            )
    for where, model in _local_model_dirs(config):
        raise ConfigError(
            f"{where}--model {model} is a local directory, which Dataflow workers cannot see; "
            "copy it to gs:// (gsutil -m cp -r) or use a hub id"
        )


def check_filesystems(config: JobConfig, options: PipelineOptions) -> None:
    """The filesystems the paths need are installed and, for gs://, authorized."""
    schemes = {scheme_of(path): f"{name} {path}" for name, path in launcher_paths(config)}
    if "s3" in schemes and importlib.util.find_spec("s3fs") is None:
        raise ConfigError(f"{schemes['s3']} is an s3:// path, which needs s3fs: pip install s3fs")
    if "gs" in schemes and not options.view_as(GoogleCloudOptions).no_auth:
        check_gcs_credentials(schemes["gs"])


def has_gcs_credentials() -> bool:
    """Whether Google Cloud credentials exist here, decided in about a second."""
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        return True  # the emulator needs none
    explicit = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    if explicit:
        return os.path.exists(explicit)
    try:
        from google.auth import _cloud_sdk

        if os.path.exists(_cloud_sdk.get_application_default_credentials_path()):
            return True
        from google.auth.compute_engine import _metadata
        from google.auth.transport import requests as auth_requests

        # On GCE, GKE and Dataflow the metadata server answers at once.
        return bool(
            _metadata.ping(auth_requests.Request(), timeout=METADATA_PING_TIMEOUT_S, retry_count=1)
        )
    except Exception as e:  # e.g. google-auth internals moved: refuse, saying why
        logger.warning(
            "Could not check for Google Cloud credentials (%s: %s); treating them as "
            "missing (--no_auth skips the check)",
            type(e).__name__,
            e,
        )
        return False


def check_gcs_credentials(name: str) -> None:
    if not has_gcs_credentials():
        raise ConfigError(
            f"{name} is a gs:// path but no Google Cloud credentials were found: run "
            "`gcloud auth application-default login`, or set GOOGLE_APPLICATION_CREDENTIALS "
            "to a service-account key file"
        )


def preflight(config: JobConfig, options: PipelineOptions) -> None:
    """Every environment check, in order; raises `ConfigError` on the first failure."""
    check_runner(options)
    if not is_local(options):
        check_remote_paths(config)
    check_filesystems(config, options)


def normalized(path: str) -> str:
    """A path compared by what it names: symlinks, `.`, `..` and trailing slashes resolved
    locally; for URIs (gs://, s3://) the same normalization of the path part."""
    if is_remote(path):
        bucket, _, key = path.split("://", 1)[1].partition("/")
        key = posixpath.normpath("/" + key).rstrip("/")
        return f"{scheme_of(path)}://{bucket}{key}"
    return os.path.realpath(os.path.abspath(os.path.expanduser(strip_file_scheme(path))))


def _inside(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def check_output_overlap(config: JobConfig, input_files: Iterable[str]) -> None:
    """`--output` may not hold anything the run reads: `--overwrite` (and the final
    commit) would delete it.

    Raises:
        ConfigError: naming the flag whose path lies in --output.
    """
    output = normalized(config.output)
    reads: list[tuple[str, str]] = [("--input", f) for f in input_files]
    reads += [(name, path) for name, path in launcher_paths(config) if name != "--output"]
    for name, path in reads:
        if _inside(normalized(path), output):
            raise ConfigError(
                f"{name} {path} lies in --output {config.output}, which this run writes and "
                "clears; choose another --output"
            )
    if config.skip_existing and _inside(output, normalized(config.skip_existing)):
        raise ConfigError(
            f"--output {config.output} lies in --skip-existing {config.skip_existing}; write "
            "the new rows to a directory of their own"
        )
    for where, model in _local_model_dirs(config):
        if _inside(normalized(model), output):
            raise ConfigError(f"{where}--model {model} lies in --output {config.output}")
