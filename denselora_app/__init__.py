"""DenseLoRA Studio: the DenseLoRA method, a training engine, a CLI and a Gradio app.

The folders follow the data flow (docs/architecture.md draws it): ``denselora/`` the method; ``rules.py`` and
``config.py`` the allowed values and the run configuration; ``runs/`` the run folder; ``hub/`` the Hugging Face Hub;
``engine/`` data, models and training; ``serving/`` chat and evaluation; ``ui/`` and ``cli.py`` the front ends.
Each imports only the ones before it (tests/test_layout.py).
"""

import logging

# peft imports bitsandbytes when it is installed; on an AVX-512 CPU bitsandbytes then asks for the optional `kernels`
# package, which fetches a faster 4-bit kernel from the Hub at run time. The studio does without it (and offline
# cannot have it). The terminal never shows other libraries' records (terminal.py); this keeps that advice out of
# every run's log pane too, which shows any library's warnings.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
