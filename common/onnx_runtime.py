"""onnxruntime with its telemetry off: every component imports the runtime from here.

Since 1.32 the PyPI build for Linux records each process and inference session (a device id and
a queue of events under ``~/.cache/Microsoft/DeveloperTools/.onnxruntime``) to upload to
Microsoft: a scorer must not phone home about the models it serves, and on a read-only root the
refused file was a non-JSON warning line in the logs. ``ORT_DISABLE_TELEMETRY`` is read once,
when the runtime loads, so it is set before the import; an operator's own value is kept.
"""
import os

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

import onnxruntime  # noqa: TID251 - the one import, after the setting above

__all__ = ["onnxruntime"]
