"""DenseLoRA Studio's web app: `python app.py` (`make run`), also the Hugging Face Spaces entry point.

Serves on http://127.0.0.1:7860 unless GRADIO_SERVER_NAME / GRADIO_SERVER_PORT say otherwise (gradio reads them).
The terminal shows the studio's own messages; libraries' records and warnings go to the studio's log file
(``~/.cache/denselora-studio/logs/denselora.log``), or to the terminal too with DENSELORA_DEBUG=1.
"""

import logging
import os

from denselora_app.hub.hosting import on_zerogpu
from denselora_app.terminal import Terminal
from denselora_app.ui import CSS, build_app

# gradio lets one event wait in the queue on ZeroGPU unless told otherwise (made for one-button demos); the studio's
# pages poll (the live view's timer) and several visitors use it at once, so more must be able to wait. GPU calls
# still go one at a time (the chat engine's queue).
ZEROGPU_QUEUE_SIZE = 64


def main() -> None:
    with Terminal(debug=os.environ.get("DENSELORA_DEBUG") == "1") as terminal:
        logging.getLogger("denselora_app").info("Libraries' messages go to %s", terminal.log_file)
        logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's own health checks would log every request
        build_app().queue(max_size=ZEROGPU_QUEUE_SIZE if on_zerogpu() else None).launch(css=CSS)


if __name__ == "__main__":
    main()
