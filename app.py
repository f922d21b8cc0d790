"""DenseLoRA Studio's web app: `python app.py` (`make run`), also the Hugging Face Spaces entry point.

Serves on http://127.0.0.1:7860 unless GRADIO_SERVER_NAME / GRADIO_SERVER_PORT say otherwise (gradio reads them).
"""

import logging

from denselora_app.ui import CSS, build_app


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's own health checks would log every request
    build_app().queue().launch(css=CSS)


if __name__ == "__main__":
    main()
