"""visguard-nsfw: the open_nsfw ONNX image classifier as a visguard backend and format (``opennsfw``)."""

from __future__ import annotations

from visguard import hookimpl


@hookimpl
def register_backends(register):
    from visguard_nsfw.classifier import OpenNSFWBackend

    register("opennsfw", OpenNSFWBackend)


@hookimpl
def register_formats(register):
    from visguard_nsfw.classifier import OpenNSFWFormat

    register("opennsfw", OpenNSFWFormat)


@hookimpl
def register_model_formats(register):
    from visguard_nsfw.classifier import OpenNSFWFormat

    register("opennsfw", OpenNSFWFormat)
