"""DenseLoRA Studio's web app: `python app.py` (`make run`), also the Hugging Face Spaces entry point.

Serves on http://127.0.0.1:7860 unless GRADIO_SERVER_NAME / GRADIO_SERVER_PORT say otherwise (gradio reads them).
The terminal shows the studio's own messages; libraries' records and warnings go to the studio's log file
(``~/.cache/denselora-studio/logs/denselora.log``), or to the terminal too with DENSELORA_DEBUG=1.
"""

import logging
import os
import sys

from denselora_app.config import StudioError
from denselora_app.hub.hosting import on_space
from denselora_app.terminal import Terminal
from denselora_app.ui import CSS, build_app, openai_api, server

# On a Space the queue is bounded, so no visitor can pile up requests without end (past it gradio answers "queue
# full"); it is not 1, gradio's own default on ZeroGPU (made for one-button demos): the studio's pages poll (the live
# view's timer) and several visitors use it at once. GPU calls still go one at a time (the chat engine's queue).
SPACE_QUEUE_SIZE = 64


def main() -> None:
    with Terminal(debug=os.environ.get("DENSELORA_DEBUG") == "1") as terminal:
        logging.getLogger("denselora_app").info("Libraries' messages go to %s", terminal.log_file)
        logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's own health checks would log every request
        try:
            options = server.launch_options()
        except StudioError as err:
            logging.getLogger("denselora_app").error("%s", err)
            sys.exit(2)
        demo = build_app().queue(max_size=SPACE_QUEUE_SIZE if on_space() else None)
        demo.launch(css=CSS, **options, prevent_thread_lock=True)
        openai_api.mount(demo.app)  # the OpenAI API at /v1, from the Chat tab's engine
        demo.block_thread()


if __name__ == "__main__":
    main()
