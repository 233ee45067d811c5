"""Deployment: a self-explaining model (ONNX / TorchScript) and an explanation service with a viewer.

``export_onnx`` / ``export_torchscript`` write one model whose single call
returns the predictions and NEMt's maps for every label; ``create_app``
builds the FastAPI service (``/v1/explain``, ``/v1/model``, ``/health`` and
the browser viewer at ``/``). The service module is imported lazily so that
exporting needs neither FastAPI nor uvicorn.
"""
from nemt.deploy.export import (SelfExplainingModel, check_onnx, export_metadata, export_model, export_onnx,
                                export_torchscript, load_torchscript, read_onnx_metadata)

__all__ = ["SelfExplainingModel", "check_onnx", "create_app", "export_metadata", "export_model", "export_onnx",
           "export_torchscript", "load_torchscript", "read_onnx_metadata", "serve"]


def __getattr__(name: str):
    if name in ("create_app", "serve"):
        from nemt.deploy import service
        return getattr(service, name)
    raise AttributeError(f"module 'nemt.deploy' has no attribute {name!r}")
