"""Export a run's DenseLoRA adapter where DenseLoRA is not installed: a standard PEFT LoRA adapter, a merged model
folder, a GGUF file.

``build`` (``export_run``: the checks, the order of the work, the report and card), ``source`` (the run's adapter read
as per-layer factors), ``lora`` (the exact LoRA of an identity-activation adapter; the LoRA folder), ``fit`` (a rank-K
LoRA fitted on calibration data for a GELU or SiLU adapter, and its measured error), ``merged`` (the base's shards
with the update added, streamed), ``gguf`` (the merged model as GGUF, with an Ollama Modelfile).
"""

from denselora_app.export.build import EXPORT_REPORT, ExportResult, export_run
from denselora_app.export.source import ExportError

__all__ = ["EXPORT_REPORT", "ExportError", "ExportResult", "export_run"]
