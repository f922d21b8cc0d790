"""The Gradio app of DenseLoRA Studio: one module per tab, on top of the training engine's public functions."""

from denselora_app.ui.app import CSS, TITLE, build_app

__all__ = ["CSS", "TITLE", "build_app"]
