"""The manifest: one TOML file that declares a deployment, and its env overlays.

    _base      named defaults, name patterns, `invalid()` (an error with a hint), `Section`
    workload   [app], [model], [compute] (`GpuSpec`: one entry of the GPU chain)
    image      [engine], [image], [volumes]
    serving    [scaling], [concurrency], [cold_start], [decoding], [[endpoints]], [secrets]
    root       `Manifest`: every section, the rules across sections, the expanded GPU chain
    loading    read a file once, merge overlays, validate each target once, translate errors

`load(path, env=None)` returns one validated target (`Loaded`); `load_targets(path)` the
base and every env overlay.
"""

from .image import EngineKind, EngineSection, ImageSection, VolumeSpec, VolumesSection
from .loading import Loaded, Source, Targets, deep_merge, load, load_targets, read
from .root import Manifest, json_schema
from .serving import (
    Auth,
    ColdStartSection,
    ConcurrencySection,
    DecodingSection,
    Endpoint,
    EndpointKind,
    ScalingSection,
    SecretsSection,
)
from .workload import AppSection, ComputeSection, Dtype, GpuSpec, ModelSection

__all__ = [
    "AppSection",
    "Auth",
    "ColdStartSection",
    "ComputeSection",
    "ConcurrencySection",
    "DecodingSection",
    "Dtype",
    "Endpoint",
    "EndpointKind",
    "EngineKind",
    "EngineSection",
    "GpuSpec",
    "ImageSection",
    "Loaded",
    "Manifest",
    "ModelSection",
    "ScalingSection",
    "SecretsSection",
    "Source",
    "Targets",
    "VolumeSpec",
    "VolumesSection",
    "deep_merge",
    "json_schema",
    "load",
    "load_targets",
    "read",
]
